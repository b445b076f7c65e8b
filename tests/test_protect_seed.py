"""The seed methods DLADiff and CAP, and the shared pieces they brought (protect.md §8, §9).

Shared pieces: the cross-attention recorder (maps are softmax rows, the UNet is left as it was, gradients
reach the image), differentiable face crops and the multi-encoder identity loss, the encoder stand-ins
loaded through the catalog, the Gram-matrix consistency loss.

DLADiff: layer 1 works as ASPL's efficacy test demands (the attacker's denoising loss on the clean photos
is higher after DreamBooth on the protected photos, same seeds); layer 2 lowers the identity encoders'
cosine similarity to the clean images below what random noise of the same budget does; the per-layer and
total budgets hold and are recorded.

CAP: the output for a file does not depend on the order of the files; with R = 0 it is its host, byte for
byte; from k̂ on it lowers the Gram consistency loss of the set below its host's, every step landing at
least as high on the host's loss as the host's own step would (same seeds).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images, write_sign_noise
from PIL import Image

from cloak.adversarial.identity import IdentityLoss, Region, crop_resize, square_box
from cloak.api import Common, run_protect
from cloak.diffusion.attention import CrossAttentionRecorder
from cloak.errors import UsageError
from cloak.io.images import read_images
from cloak.protect.cap import (
    CapOptions,
    StyleConsistency,
    canonical_order,
    consistency_loss,
    gram_matrices,
    style_distances,
)


def _common(method: str, options: dict, seed: int = 0, **kw) -> Common:
    return Common(method=method, tiny=True, seed=seed, options={k: str(v) for k, v in options.items()}, argv=[],
                  **kw)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("*.png"))}


def _unet_inputs(sd, n: int = 2):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500][:n])
    text = torch.randn(n, 77, sd.text_encoder.config.hidden_size, generator=g)
    return z, t, text


# --- cross-attention recorder ----------------------------------------------------------------------

def test_attention_recorder_records_softmax_maps_and_restores_the_unet(tiny_sd):
    unet = tiny_sd.unet
    z, t, text = _unet_inputs(tiny_sd)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        reference = unet(z, t, text).sample
        with CrossAttentionRecorder(unet, 4) as rec:
            out = unet(z, t, text).sample
            maps = rec.maps()
    assert maps.shape == (2, 16, 77)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 16), atol=1e-5)  # softmax rows over the tokens
    assert torch.allclose(out, reference, atol=1e-4)  # explicit attention computes the same thing
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    with pytest.raises(RuntimeError, match="no cross-attention map"):
        with torch.no_grad(), CrossAttentionRecorder(unet, 3) as rec:
            unet(z, t, text)
            rec.maps()


def test_attention_maps_carry_gradients_and_compat_drops_half_the_heads(tiny_sd):
    unet = tiny_sd.unet
    z, t, text = _unet_inputs(tiny_sd)
    z = z.requires_grad_(True)
    with CrossAttentionRecorder(unet, 4) as rec:
        unet(z, t, text)
        full = rec.maps()
        (grad,) = torch.autograd.grad(full[:, :, 1:].pow(2).sum(), z)
    assert grad.abs().sum() > 0
    with torch.no_grad(), CrossAttentionRecorder(unet, 4, compat_half_heads=True) as rec:
        unet(z, t, text)
        half = rec.maps()
    assert half.shape == full.shape and not torch.allclose(half, full.detach())


# --- identity crops and loss -----------------------------------------------------------------------

def test_square_box_stays_inside_and_crop_is_differentiable():
    assert square_box((50, 10, 70, 40), 64, 64) == (34, 10, 64, 40)  # 30² around the box, shifted inside
    x1, y1, x2, y2 = square_box((-5, -5, 30, 20), 64, 64, margin=0.2)
    assert x1 >= 0 and y1 >= 0 and x2 <= 64 and y2 <= 64 and x2 - x1 == y2 - y1
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = crop_resize(x * 2 - 1, [Region((0, 0, 32, 32), "face"), Region(None, "image")], 16)
    assert out.shape == (2, 3, 16, 16)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g[0, :, 40:, 40:].abs().sum() == 0 and g[0, :, :32, :32].abs().sum() > 0  # only the box feeds image 0
    assert g[1].abs().sum() > 0


def test_identity_loss_is_one_per_encoder_on_the_clean_images():
    class Pool(torch.nn.Module):
        input_size = 8

        def forward(self, x):
            return x.flatten(1)

    clean = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = IdentityLoss([Pool(), Pool()], [Region(None, "image")] * 2, clean)
    assert float(loss(clean)) == pytest.approx(2.0, abs=1e-5)
    assert float(loss(-clean)) < 0


# --- encoders ----------------------------------------------------------------------------------------

def test_encoder_stand_ins_load_through_the_catalog(shared_cache, tmp_path):
    from cloak.models.encoders import VGG19_FILE, load_identity_encoder, load_vgg19, load_vgg_features
    from cloak.models.handle import Models

    models = Models(cache_dir=shared_cache, tiny=True)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for name, size in (("arcface-irse50", 112), ("ip-adapter-image-encoder", 224)):
        enc = load_identity_encoder(models, name)
        assert enc.input_size == size
        emb = enc(crop_resize(x, [Region(None, "image")] * 2, size))
        assert emb.ndim == 2 and emb.shape[0] == 2
        assert not any(p.requires_grad for p in enc.parameters())
    feats = load_vgg_features(models, ("conv1_1", "conv2_1", "conv3_1"))(x)
    assert [f.shape[1:] for f in feats] == [(64, 64, 64), (128, 32, 32), (256, 16, 16)]
    records = {r.id: r for r in models.records()}
    assert records["tiny-vgg19"].stand_in and records["tiny-clip-vision"].stand_in
    # The release file also holds the classifier: the loader reads exactly the features.* tensors.
    _, path, _ = models.resolve("vgg19-imagenet", "test")
    state = torch.load(path / VGG19_FILE, weights_only=True)
    state["classifier.0.weight"] = torch.zeros(2, 2)
    (tmp_path / "v").mkdir()
    torch.save(state, tmp_path / "v" / VGG19_FILE)
    assert torch.equal(load_vgg19(tmp_path / "v")[0].weight, state["features.0.weight"])


# --- Gram consistency --------------------------------------------------------------------------------

def test_gram_consistency_is_zero_for_equal_styles_and_order_free():
    f = [torch.rand(3, 4, 5, 5), torch.rand(3, 2, 3, 3)]
    grams = gram_matrices(f)
    assert grams[0].shape == (3, 4, 4)
    assert torch.allclose(grams[0][0], f[0][0].flatten(1) @ f[0][0].flatten(1).T / 100)
    assert float(consistency_loss(grams)) > 0
    same = gram_matrices([t[:1].expand(3, -1, -1, -1) for t in f])
    assert float(consistency_loss(same)) == pytest.approx(0.0, abs=1e-12)
    perm = [2, 0, 1]
    assert torch.allclose(style_distances(gram_matrices([t[perm] for t in f])), style_distances(grams)[perm])


# --- DLADiff -------------------------------------------------------------------------------------------

ATTACK = ["--tiny", "-q", "--json", "-o", "class_images=0", "-o", "lr=1e-4", "--steps", "60", "--num-images", "0"]


def test_dladiff_layer1_raises_attackers_loss_on_clean_photos(cli, tmp_path):
    """As ASPL's efficacy test (tests/test_efficacy.py): lr 1e-4 and η 0.1 so tiny-sd moves; same seeds.
    Margins seen: 0.014–0.024 on losses ≈ 0.73 across seeds 0–2."""
    clean = write_images(tmp_path / "clean", n=3, seed=0)
    r = cli("protect", "--method", "dladiff", "--tiny", "-q", "-o", "layers=ft", "-o", "class_images=0",
            "-o", "lr=1e-4", "-o", "epochs=6", "-o", "static_steps=10", "--eps", "0.1", "--eps-unit", "m11", clean,
            tmp_path / "protected")
    assert r.exit_code == 0, r.stderr
    write_sign_noise(clean, tmp_path / "noise", 12)  # the control: the same budget (0.1 m11), random signs
    losses = {}
    for name, train in (("clean", clean), ("noise", tmp_path / "noise"), ("protected", tmp_path / "protected")):
        r = cli("attack", *ATTACK, "--ref", clean, train, tmp_path / f"attack-{name}")
        assert r.exit_code == 0, r.stderr
        losses[name] = json.loads(r.stdout)["summary"]["ref_denoising_loss"]
    print("dladiff layer 1 efficacy:", losses)
    assert losses["protected"] > losses["noise"] + 0.002 and losses["protected"] > losses["clean"] + 0.002, losses


class _AttentionCtx:
    """The parts of RunContext that DLADiff's step 1 reads."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.compat = False
        self.dtype = torch.float32  # the run's dtype (autocast_for reads it)


def _attention_setup(tiny_sd, **options):
    from cloak.diffusion import encode_prompts
    from cloak.protect.dladiff import DLADiff

    ctx = _AttentionCtx()
    method = DLADiff(DLADiff.Options(**options), ctx)
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    noise = (clean + 0.1 * torch.sign(torch.rand(clean.shape, generator=gen) - 0.5)).clamp(-1, 1)  # ±ε, ε 0.1
    with torch.no_grad():
        text = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [method.opts.instance_prompt])
    return method, ctx, clean, noise, text


def _attention_term(method, ctx, sd, text, recorder, pixels, clean, seeds=range(4)) -> float:
    """Mean attention term D over fixed draws (the same for every image set compared)."""
    total = 0.0
    for seed in seeds:
        ctx.generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            att, _ = method.attention_loss(sd, sd.unet, text, recorder, pixels, clean, method.draw(sd, pixels))
        total += float(att)
    return total / len(seeds)


@pytest.mark.parametrize("target", ["reference", "zero"])
def test_dladiff_attention_term_has_a_gradient_on_tiny_sd(tiny_sd, target):
    """Step 1's attention term D, as optimised: with the per-token max normalisation [PROP] it and its gradient
    w.r.t. the pixels are nonzero on tiny-sd; Anti-Diffusion's ×100-and-clamp (the previous default, kept as
    ``attention_norm=clamp``) saturates every map there (probabilities ≈ 1/77 > 0.01), so D and its
    gradient are exactly 0 (D is flat at 0 from the reference, at −1 for the zero target). Seen: |∇D|₁ ≈ 3e-3
    (reference, ±0.1 noise image), 0 with clamp."""
    torch.set_num_threads(1)
    for norm in ("token_max", "clamp"):
        method, ctx, clean, noise, text = _attention_setup(tiny_sd, attention_target=target, attention_norm=norm)
        resolution, positions = method.attention_positions(tiny_sd, (64, 64))
        pixels = noise.clone().requires_grad_(True)
        with CrossAttentionRecorder(tiny_sd.unet, resolution) as recorder:
            recorder.positions = positions
            att, ldn = method.attention_loss(tiny_sd, tiny_sd.unet, text, recorder, pixels, clean,
                                             method.draw(tiny_sd, pixels))
            (grad,) = torch.autograd.grad(att, pixels)
        assert torch.isfinite(grad).all() and ldn.requires_grad
        value = float(att.detach())
        if norm == "token_max":
            assert value != 0 and grad.abs().sum() > 0, (target, value)
        else:  # every map saturated: D is flat (0 from the reference, −1 for the zero target)
            assert value == {"reference": 0.0, "zero": -1.0}[target] and grad.abs().sum() == 0, (target, value)


def test_dladiff_attention_steps_move_the_maps_further_than_noise(tiny_sd):
    """Step 1 (``attention_target=reference``, default weight 1) for 6 PGD steps within ε = 0.1: the attention
    term D — the distance of the maps from the clean images' maps, on fixed draws — ends higher than after
    ±ε random-sign noise of the same budget. Seen: D 1.43e-4 after the steps, 7.0e-5 for the noise (0 clean);
    with Anti-Diffusion's clamp both are 0."""
    from cloak.adversarial.groups import Groups

    torch.set_num_threads(1)
    method, ctx, clean, noise, text = _attention_setup(tiny_sd)
    resolution, positions = method.attention_positions(tiny_sd, (64, 64))
    with CrossAttentionRecorder(tiny_sd.unet, resolution) as recorder:
        recorder.positions = positions
        x0 = Groups.from_list(list(clean))
        ctx.generator = torch.Generator().manual_seed(0)
        out, _ = method.attention_step(tiny_sd, tiny_sd.unet, text, recorder, x0.clone(), x0, 6, 0.1, 0.02,
                                       [(resolution, positions)])
        attacked = torch.stack(out.images())
        assert (attacked - clean).abs().max() <= 0.1 + 1e-6
        assert len(method.attention_terms) == 6 and max(method.attention_terms) > 0
        d_attacked = _attention_term(method, ctx, tiny_sd, text, recorder, attacked, clean)
        d_noise = _attention_term(method, ctx, tiny_sd, text, recorder, noise, clean)
    print("dladiff attention term:", {"attacked": d_attacked, "noise": d_noise})
    assert d_attacked > 1.5 * d_noise > 0, (d_attacked, d_noise)


def test_dladiff_layer2_lowers_identity_similarity_more_than_noise(tmp_path, shared_cache):
    from cloak.models.encoders import load_identity_encoder
    from cloak.models.handle import Models

    images = write_images(tmp_path / "in", n=2)
    rep = run_protect(images, tmp_path / "out", common=_common("dladiff", {"layers": "zs", "zs_steps": 6}))
    budget = rep.summary["budget"]
    assert budget["layers"].keys() == {"zs"} and budget["eps_m11"] == pytest.approx(16 / 255)
    assert all(item.linf_255 <= 8 for item in rep.items)
    assert rep.summary["implementation"].startswith("DLADiff (implemented from the published description")

    clean = read_images(images, 64).pixels
    protected = read_images(tmp_path / "out", 64).pixels
    levels = torch.from_numpy(np.random.default_rng(0).choice([-8, 8], size=clean.shape)).float()
    noise = (clean + levels / 127.5).clamp(-1, 1)
    models = Models(cache_dir=shared_cache, tiny=True)
    regions = [Region(tuple(i.model_extra["zs_box"]), "face") if i.model_extra["zs_box"] else Region(None, "image")
               for i in rep.items]
    for name in ("arcface-irse50", "ip-adapter-image-encoder"):
        loss = IdentityLoss([load_identity_encoder(models, name)], regions, clean)
        with torch.no_grad():
            cos_protected, cos_noise = loss(protected), loss(noise)
        assert cos_protected < cos_noise, (name, float(cos_protected), float(cos_noise))


def test_dladiff_budgets_and_records(tmp_path):
    images = write_images(tmp_path / "in", n=2)
    ref = write_images(tmp_path / "ref", n=2, seed=3)
    opts = {"class_images": 0, "epochs": 1, "attention_steps": 1, "surrogate_steps": 1, "pgd_steps": 1,
            "static_steps": 1, "zs_steps": 2, "eps_zs": "4/255"}
    rep = run_protect(images, tmp_path / "out", ref=str(ref), common=_common("dladiff", opts))
    budget = rep.summary["budget"]
    assert budget["layers"]["ft"]["eps_m11"] == pytest.approx(0.05)
    assert budget["layers"]["zs"]["eps_m11"] == pytest.approx(8 / 255)
    assert budget["eps_m11"] == pytest.approx(0.05 + 8 / 255)
    assert all(item.linf_255 <= int(budget["eps_m11"] * 127.5) for item in rep.items)
    assert rep.summary["layer_ft"]["static_surrogate"]["steps"] == 1
    assert rep.summary["clean_reference"] == "ref"
    assert set(rep.method_info["proposals"]) >= {"epochs", "attention_weight", "encoders", "eps_zs"}
    for item in rep.items:
        assert item.model_extra["zs_region"] in ("face", "image")
        assert set(item.model_extra["identity_cos"]) == {"arcface-irse50", "ip-adapter-image-encoder"}
    with pytest.raises(UsageError, match="layers"):
        run_protect(images, tmp_path / "bad", common=_common("dladiff", {"layers": "ft,xx"}))


def test_dladiff_without_a_face_attacks_the_whole_image_and_says_so(tmp_path):
    from cloak.protect.dladiff import DLADiff

    class NoFaces:
        def detect(self, rgb):
            return []

    class FakeModels:
        def faces(self, role="faces"):
            return NoFaces()

    ctx = type("Ctx", (), {"models": FakeModels()})()
    method = DLADiff(DLADiff.Options(), ctx)
    regions = method.face_regions(torch.zeros(2, 3, 64, 64))
    assert regions == [Region(None, "image")] * 2


# --- CAP ---------------------------------------------------------------------------------------------

CAP_TINY = {"host": "aspl", "class_images": 0, "iterations": 2, "surrogate_steps": 1, "pgd_steps": 2,
            "ratio_max": 3}


def _canonical_copy(src: Path, dst: Path) -> Path:
    """Copy a folder's images renamed so that natural order = CAP's canonical order (host runs comparable)."""
    images = read_images(src, 64)
    dst.mkdir(parents=True)
    for position, index in enumerate(canonical_order(images)):
        shutil.copy(images.items[index].path, dst / f"img{position}.png")
    return dst


def test_cap_result_per_file_does_not_depend_on_file_order(tmp_path):
    src = write_images(tmp_path / "src", n=3)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    # Same three images under permuted names: b/img0 = a/img2, b/img1 = a/img0, b/img2 = a/img1.
    for i in range(3):
        shutil.copy(src / f"img{i}.png", a / f"img{i}.png")
        shutil.copy(src / f"img{i}.png", b / f"img{(i + 1) % 3}.png")
    run_protect(a, tmp_path / "out_a", common=_common("cap", CAP_TINY))
    run_protect(b, tmp_path / "out_b", common=_common("cap", CAP_TINY))
    out_a, out_b = _pngs(tmp_path / "out_a"), _pngs(tmp_path / "out_b")
    for i in range(3):
        assert out_a[f"img{i}.png"] == out_b[f"img{(i + 1) % 3}.png"]
    assert out_a["img0.png"] != np.asarray(Image.open(a / "img0.png")).tobytes()


def test_cap_with_ratio_zero_is_its_host_byte_for_byte(tmp_path):
    images = _canonical_copy(write_images(tmp_path / "src", n=2), tmp_path / "in")
    host_opts = {k: v for k, v in CAP_TINY.items() if k not in ("host", "ratio_max")}
    run_protect(images, tmp_path / "host", common=_common("aspl", host_opts))
    rep = run_protect(images, tmp_path / "cap", common=_common("cap", {**CAP_TINY, "ratio_max": 0}))
    assert rep.summary["cap"]["cap_steps"] > 0
    assert _pngs(tmp_path / "host") == _pngs(tmp_path / "cap")


def test_cap_lowers_style_inconsistency_and_never_lowers_the_host_step(tmp_path, shared_cache):
    """FSMG host, same seeds, same image order: the host's draws are the same in both runs."""
    from cloak.models.encoders import load_vgg_features
    from cloak.models.handle import Models

    images = _canonical_copy(write_images(tmp_path / "src", n=3), tmp_path / "in")
    host = {"class_images": 0, "surrogate_steps": 4, "lr": 1e-4, "unit": "m11", "eps": 0.1, "alpha": 0.01, "steps": 8}
    run_protect(images, tmp_path / "host", common=_common("fsmg", host))
    rep = run_protect(images, tmp_path / "cap", common=_common("cap", {**host, "host": "fsmg", "ratio_max": 5}))
    cap = rep.summary["cap"]
    assert cap["total_pgd_steps"] == 8 and cap["cap_steps"] == 5  # k = 4..8 (k̂ = K/2)
    style = StyleConsistency(load_vgg_features(Models(cache_dir=shared_cache, tiny=True), tuple(cap["style_layers"])))
    cons = {name: float(style.distances(read_images(tmp_path / name, 64).pixels).mean())
            for name in ("in", "host", "cap")}
    assert cons["cap"] < cons["host"], cons
    assert cap["consistency_final"] == pytest.approx(cons["cap"], rel=1e-3)  # measured on the 8-bit output
    chosen, own = cap["step_loss_chosen"], cap["step_loss_host_step"]
    # A step takes r > 0 only for a strictly higher host loss (≥ after the report's rounding to 6 digits);
    # with r = 0 it is the host's own step, the same figure.
    assert len(chosen) == len(own) == len(cap["lambdas"]) == 5
    for lam, c, h in zip(cap["lambdas"], chosen, own):
        assert (c >= h) if lam > 0 else (c == h), (lam, c, h)
    assert any(lam > 0 for lam in cap["lambdas"])


class _ToyHost:
    """The parts of a host CAP's step calls, on plain tensors."""

    pgd_steps_done = 0

    def update(self, x, x0, loss_fn, eps, alpha):
        raise AssertionError("from k̂ on CAP replaces the host's step")

    def loss_and_grad(self, x, loss_fn):
        from cloak.adversarial.groups import loss_and_grad

        return loss_and_grad(x, loss_fn)

    def loss_value(self, x, loss_fn):
        from cloak.adversarial.groups import loss_value

        return loss_value(x, loss_fn)

    def total_pgd_steps(self):
        return 2


@pytest.mark.parametrize("sign, expected_r, expected_x, expected_loss",
                         [(-1, 1, (0.1, -0.1), 0.1), (1, 0, (0.1, 0.0), 0.05)])
def test_cap_step_takes_the_candidate_with_the_highest_host_loss(sign, expected_r, expected_x, expected_loss):
    """CAP's step on a toy host whose answer is known: L_re(x) = x₁ − 5(x₁ + x₂)², L_cons = x₂, α 0.1, from
    x = 0 where g_re = (1, 0) and g_c = (0, 1). The host's own step (r = 0) goes to (0.1, 0), L_re 0.05.
    s = −1: r = 1 steps along sign(g_re − g_c) = (+, −) to (0.1, −0.1), L_re 0.1, so CAP must take r = 1
    (r ≥ 2 is the same point, not re-evaluated). s = +1: r ≥ 1 goes to (0.1, 0.1), L_re −0.1, so r = 0.
    (The end-to-end check it replaces, "chosen ≥ host step", held for any choice: r = 0 is a candidate.)"""
    from cloak.adversarial.groups import Groups
    from cloak.protect.cap import CapPlugin

    class Toy(CapPlugin, _ToyHost):
        pass

    def loss_fn(pixels, b, rows=None):
        a, c = pixels[..., 0], pixels[..., 1]
        return (a - 5 * (a + c) ** 2).mean()

    toy = Toy()
    toy.cap_setup(lambda x: sum(p[..., 1].sum() for p in x.parts), ratio_max=3, sign=sign, start_fraction=0.0)
    x0 = Groups.of(torch.zeros(1, 1, 1, 2))
    x, _ = toy.update(x0.clone(), x0, loss_fn, 1.0, 0.1)
    st = toy.cap_state
    assert torch.allclose(x.parts[0].flatten(), torch.tensor(expected_x))
    assert st["lambdas"] == [expected_r] and st["evaluated"] == 2
    (chosen, host), = st["step_loss"]
    assert chosen == pytest.approx(expected_loss) and host == pytest.approx(0.05)


def test_cap_options_pass_to_the_host_and_foreign_ones_are_refused(tmp_path):
    from cloak.protect.cap import Cap

    opts = CapOptions(host="fsmg", steps=3)
    host_opts = Cap(opts, None).host_options()
    assert host_opts.steps == 3 and host_opts.surrogate_steps == 1000 and host_opts.eps == 0.05
    assert Cap(CapOptions(host="simac"), None).host_options().eps == 0.05  # CAP §5 budget for every host
    assert Cap(CapOptions(host="aspl", surrogate_steps=None), None).host_options().surrogate_steps == 3
    assert CapOptions(style_layers="conv1_1,conv2_1").style_layers == ["conv1_1", "conv2_1"]
    with pytest.raises(UsageError, match="do not apply to host aspl"):
        Cap(CapOptions(host="aspl", steps=3), None).host_options()
    images = write_images(tmp_path / "in", n=2)
    with pytest.raises(UsageError, match="cap_sign"):
        run_protect(images, tmp_path / "out", common=_common("cap", {"cap_sign": 2}))
