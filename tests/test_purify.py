"""Purifiers: the run contract with per-image LPIPS, stand-in path = real-weights path, and the math pieces.

The end-to-end tests run every registered purifier on the built-in stand-ins (``--tiny``); the unit tests
check each algorithm's own machinery against independent references (an exact convex optimum, identity
purifiers, hand-computed schedules).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image

from cloak.api import Common, run_purify
from cloak.io.report import Report
from cloak.models.catalog import CATALOG
from cloak.purify import PURIFY

EFFORT = 0.05


def _common(name: str, **kw) -> Common:
    return Common(method=name, effort=EFFORT, seed=3, options=dict(PURIFY.get(name).tiny_options), argv=[], **kw)


def _pixels(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)).tobytes()
            for p in sorted(folder.rglob("*.png"))}


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("name", PURIFY.names())
def test_purifier_contract_and_standin_path_is_the_real_path(name, tmp_path):
    """Names, sizes and a report with per-image LPIPS on the stand-ins; then the same run with the real catalog
    ids pointed (cloak.toml [models]) at the stand-ins' files gives the same bytes: only the weights differ."""
    images = write_images(tmp_path / "in", n=1, size=(48, 40))
    (images / "sub").mkdir()
    Image.fromarray(np.full((36, 52, 3), 90, np.uint8)).save(images / "sub" / "flat.jpg")

    rep = run_purify(images, tmp_path / "a", common=_common(name, tiny=True))
    a = _pixels(tmp_path / "a")
    assert sorted(a) == ["img0.png", "sub/flat.png"]
    for rel, src in (("img0.png", "img0.png"), ("sub/flat.png", "sub/flat.jpg")):
        with Image.open(images / src) as i, Image.open(tmp_path / "a" / rel) as o:
            assert i.size == o.size and o.mode == "RGB"
    data = Report.model_validate(json.loads(rep.to_json()))
    for item in data.items:
        assert item.status == "ok"
        lp = item.model_extra["lpips_to_input"]
        assert isinstance(lp, float) and lp >= 0
    assert data.summary["lpips"]["computed"] is True and data.summary["seconds_per_image_with_loading"] > 0
    assert data.summary["stand_in"] is True

    # Real ids → the stand-ins' directories. Every catalog id a stand-in replaced points at that stand-in.
    overrides = {}
    for record in data.models:
        assert record.stand_in
        for spec in CATALOG.values():
            if spec.stand_in == record.id:
                overrides[spec.id] = record.path
    config = tmp_path / "cloak.toml"
    config.write_text("[models]\n" + "".join(f'{k} = "{v}"\n' for k, v in sorted(overrides.items())))
    rep_b = run_purify(images, tmp_path / "b", common=_common(name, config=str(config)))
    assert _pixels(tmp_path / "b") == a
    assert rep_b.summary["stand_in"] is False
    assert {r.id for r in rep_b.models} <= set(overrides) and not any(r.stand_in for r in rep_b.models)


def test_missing_lpips_weights_record_null_and_warn(cli, image_dir, tmp_path):
    r = cli("purify", "--method", "jpeg", "--json", image_dir, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert all(i["lpips_to_input"] is None for i in rep["items"])
    assert rep["summary"]["lpips"]["computed"] is False
    assert any("LPIPS" in w and "cloak models pull alexnet-imagenet" in w for w in rep["warnings"])
    assert (tmp_path / "out" / "img0.png").is_file()


def test_diffshortcut_ablations_and_class_gate(tmp_path):
    images = write_images(tmp_path / "in", n=1, size=(40, 40))
    base = {"sr_steps": 1, "max_faces": 1}
    rep = run_purify(images, tmp_path / "none", common=Common(method="diffshortcut", tiny=True, argv=[],
                                                               options={**base, "codeformer": "false", "sr": "false"}))
    assert _pixels(tmp_path / "none") == _pixels(images)  # both stages off: identity
    rep = run_purify(images, tmp_path / "cat", common=Common(method="diffshortcut", tiny=True, argv=[],
                                                              options={**base, "class_name": "cat", "sr": "false"}))
    assert "faces_detected" not in rep.items[0].model_extra  # CodeFormer runs for class person only
    assert not any(r.id == "tiny-codeformer" for r in rep.models)


# ------------------------------------------------------------------------------------------------ LPIPS


def test_lpips_loads_torchvision_layout_without_download(tmp_path):
    from cloak.models.lpips import NETS, build_standin_alexnet, distance, load_lpips

    build_standin_alexnet(tmp_path)
    path = tmp_path / NETS["alex"][1]
    state = torch.load(path, weights_only=True)
    state["classifier.6.weight"] = torch.zeros(2, 2)  # a real release also holds the classifier: ignored
    torch.save(state, path)
    model = load_lpips(tmp_path, "alex")
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    d = distance(model, x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    assert float(distance(model, x, x).abs().max()) == 0
    assert torch.allclose(model.net.slice1[0].weight, state["features.0.weight"])
    del state["features.3.weight"]
    torch.save(state, path)
    from cloak.errors import ModelUnavailableError

    with pytest.raises(ModelUnavailableError, match="features.3.weight"):
        load_lpips(tmp_path, "alex")


# ------------------------------------------------------------------------------------------------ TVM


def _tv_problem(n: int = 16):
    from skimage import data

    a = np.asarray(Image.fromarray(data.astronaut()).resize((n, n), Image.LANCZOS), dtype=np.float32) / 255
    dropped = np.random.default_rng(0).random(a.shape) < 0.02
    x, keep = torch.from_numpy(a).double(), torch.from_numpy(~dropped).double()
    return x, keep


@pytest.mark.parametrize("layout, optimum", [("channels", 0.70423819559545), ("interleaved", 0.546503520845745)])
def test_tvm_pdhg_reaches_the_convex_optimum(layout, optimum):
    """Reference optima computed once with cvxpy 1.9.3 + Clarabel on the same problem (16² astronaut, mask from
    default_rng(0) < 0.02, λ 0.01): Frobenius/per-channel and spectral/interleaved forms."""
    from cloak.purify.tvm import solve_tv, tv_objective

    x, keep = _tv_problem()
    spectral = layout == "interleaved"
    if spectral:
        xm, km = x.reshape(1, 16, -1), keep.reshape(1, 16, -1)
    else:
        xm, km = x.permute(2, 0, 1).contiguous(), keep.permute(2, 0, 1).contiguous()
    start = tv_objective(xm, xm, km, 0.01, spectral)
    z = solve_tv(xm, km, 0.01, 1500, spectral=spectral)
    value = tv_objective(z, xm, km, 0.01, spectral)
    assert value < start
    assert value == pytest.approx(optimum, rel=1e-5)


def test_tv_operators_are_adjoint_and_projections_hold():
    from cloak.purify.tvm import (
        _diff_cols,
        _diff_cols_t,
        _diff_rows,
        _diff_rows_t,
        _project_groups,
        _project_simplex_ball,
    )

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    r = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    c = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    assert float((_diff_rows(z) * r).sum()) == pytest.approx(float((z * _diff_rows_t(r)).sum()))
    assert float((_diff_cols(z) * c).sum()) == pytest.approx(float((z * _diff_cols_t(c)).sum()))
    p = _project_groups(r * 10, dim=2, radius=0.3)
    assert float(p.norm(dim=2).max()) == pytest.approx(0.3)
    s = _project_simplex_ball(torch.tensor([3.0, 1.0, 0.2]))
    assert float(s.sum()) == pytest.approx(1.0) and torch.allclose(s, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(_project_simplex_ball(torch.tensor([0.2, 0.3])), torch.tensor([0.2, 0.3]))


# ------------------------------------------------------------------------------------------------ diffusion family


class _Ctx:
    def __init__(self, effort=1.0, compat=False):
        self.effort, self.compat = effort, compat
        self.generator = torch.Generator().manual_seed(0)
        self.device = torch.device("cpu")

    def iters(self, n):
        return 0 if n <= 0 else max(1, round(n * self.effort))


def _purifier(cls, effort=1.0, compat=False, **opts):
    m = cls(cls.Options(**opts), _Ctx(effort, compat))
    m._diffusions = {}
    return m


def test_diffpure_plans_keep_the_noise_level_across_effort():
    from cloak.models.archs.guided_diffusion import GaussianDiffusion
    from cloak.purify.diffpure import DiffPure, GrIDPure

    full = _purifier(DiffPure).plan_t(100, 1000)
    assert (full.timestep, full.steps) == (99, 100)  # t=100: ᾱ of step index 99, 100 ancestral steps
    fast = _purifier(DiffPure, effort=0.1).plan_t(100, 1000)  # 100 kept steps, about 10 apart
    assert abs(fast.steps - 10) <= 1 and abs(fast.timestep - 99) <= 5
    grid = _purifier(GrIDPure).plan_t(10, 1000)
    assert (grid.timestep, grid.steps) == (9, 10)
    # --compat: t=100 on the 250-step respacing, wrapper indexing (noise at index t, p_sample t..1).
    comp = _purifier(DiffPure, compat=True).plan_t(100, 250)
    table = GaussianDiffusion.respaced("250")
    assert comp.released_indexing and comp.steps == 100 and comp.timestep == int(table.timestep_map[100])


def test_ddspure_timestep_from_noise_level():
    from cloak.purify.diffpure import DDSPure, nearest_t

    m = _purifier(DDSPure)
    abar = m.diffusion(1000).alphas_cumprod
    sigma = 2 * 11 / 255
    plan = m.plan(1 / (1 + sigma**2), 1000)
    assert plan.k == int((abar - 1 / (1 + sigma**2)).abs().argmin())
    snr_gap = [abs((1 - abar[k]) / abar[k] - sigma**2) for k in (plan.k, plan.k + 1)]
    assert snr_gap[0] < snr_gap[1]
    assert nearest_t(abar, 1 / (1 + sigma**2)) == plan.k + 1
    assert nearest_t(abar, 2.0) == 1 and nearest_t(abar, 0.0) == 1000


def test_tiles_and_identity_merge():
    from cloak.purify.diffpure import GrIDPure, tile_pass, tile_starts

    assert tile_starts(512, 256, 128) == [0, 128, 256]
    assert tile_starts(40, 32, 16) == [0, 8]
    assert tile_starts(48, 32, 16) == [0, 16]

    class Identity:
        size = 32
        resize = staticmethod(GrIDPure.resize)

        def sdedit(self, x, plan, progress=None):
            return x

    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for corner in (False, True):
        assert torch.allclose(tile_pass(Identity(), x, None, corner=corner), x, atol=1e-6)

    class Tag:  # each tile returns its batch index: the merge must average the right tiles
        size = 32
        resize = staticmethod(GrIDPure.resize)

        def sdedit(self, x, plan, progress=None):
            return torch.arange(len(x), dtype=x.dtype).view(-1, 1, 1, 1).expand_as(x).clone()

    y = tile_pass(Tag(), torch.zeros(1, 3, 64, 64), None, corner=True)
    # 3×3 tiles at {0,16,32}², index = 3·row + column, then the corner tile (index 9).
    assert torch.allclose(y[..., :16, :16], torch.tensor(4.5))  # tile 0 and the corner tile's top-left quarter
    assert torch.allclose(y[..., 30, 30], torch.tensor(2.0))  # tiles 0, 1, 3, 4
    assert torch.allclose(y[..., 33, 33], torch.tensor(6.0))  # tiles 4, 5, 7, 8


# ------------------------------------------------------------------------------------------------ face paste-back


class _IdentityCodeFormer(torch.nn.Module):
    img_size = 64

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, w=0.5, adain=True):
        return x


class _SkinParser(torch.nn.Module):
    """Every pixel is class 1 (skin): the parse mask keeps the whole face square (minus the blurred border)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.in_size = 64

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, *x.shape[-2:])
        logits[:, 1] = 1
        return logits, x


class _Detector:
    def __init__(self, landmarks):
        self.landmarks = landmarks

    def detect_faces(self, bgr, conf_threshold=0.8):
        box = [*self.landmarks.min(0) - 10, *self.landmarks.max(0) + 10]
        return np.array([[*box, 0.99, *self.landmarks.reshape(-1)]])


def test_face_restorer_paste_back_geometry():
    from cloak.models.restoration import FACE_TEMPLATE_512, FaceRestorer

    rng = np.random.default_rng(0)  # a smooth random colour field: resampling keeps it, shifting does not
    rgb = np.asarray(Image.fromarray((rng.random((8, 9, 3)) * 255).astype(np.uint8)).resize((112, 96), Image.BICUBIC))
    # A face whose landmarks are the template shrunk to 40 px, rotated by 10°, placed inside the image.
    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    marks = (FACE_TEMPLATE_512 / 512 * 40 - 20) @ rot.T + np.array([56, 48])
    restorer = FaceRestorer(_IdentityCodeFormer(), _Detector(marks), _SkinParser(), torch.device("cpu"))
    restorer.det_short_side = 0  # no detector enlargement for the fake detector
    out, record = restorer.restore(rgb, upscale=1)
    assert record == {"faces_detected": 1, "faces_restored": 1} and out.shape == rgb.shape
    # Identity restoration: the face region comes back where it was (up to two resamplings).
    face = (slice(40, 56), slice(48, 64))
    error = np.abs(out[face].astype(float) - rgb[face]).mean()
    shifted = np.abs(out[face].astype(float) - np.roll(rgb, 6, axis=1)[face]).mean()
    assert error < 3 and error < shifted / 3
    assert np.array_equal(out[:, :20], rgb[:, :20])  # far from the face: untouched

    class Grey(_IdentityCodeFormer):
        def forward(self, x, w=0.5, adain=True):
            return torch.zeros_like(x)

    out, _ = FaceRestorer(Grey(), _Detector(marks), _SkinParser(), torch.device("cpu")).restore(rgb, upscale=2)
    assert out.shape == (192, 224, 3)
    centre = out[2 * 44:2 * 52, 2 * 52:2 * 60].astype(float)
    assert np.abs(centre - 128).max() <= 2  # the restored (grey) face replaced the centre


def test_codeformer_grey_threshold_is_upstreams_10():
    """FaceRestoreHelper.read_image calls is_gray(img, threshold=10) (sczhou/CodeFormer since 6c247ba): green
    off by ±k at random, so the mean variance of the channel differences is 2k²/3 — k 3 (6) counts as grey
    (it did not under the old threshold 5), k 4 (10.7) does not."""
    from cloak.models.restoration import is_gray

    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(32, 32)).astype(np.int16)
    for k, grey in ((1, True), (3, True), (4, False)):
        green = base + k * rng.choice([-1, 1], size=base.shape)
        rgb = np.stack([base, green, base], -1).astype(np.uint8)
        assert is_gray(rgb) == grey, k


class _SizeDetector(_Detector):
    def detect_faces(self, bgr, conf_threshold=0.8):
        self.seen = bgr.shape[:2]
        return np.zeros((0, 15))


@pytest.mark.parametrize("shrink, side", [(False, 900), (True, 640)])
def test_codeformer_detection_enlarges_only_unless_asked_to_shrink(shrink, side):
    """A 900×1200 image goes to the detector as it is ([PROP], CodeFormer's helper before a75e7ae, which
    DiffShortcut ran) or shrunk to a 640 short side (det_shrink, CodeFormer today); a 512² one is enlarged to
    640 either way."""
    from cloak.models.restoration import FaceRestorer

    detector = _SizeDetector(np.zeros((5, 2)))
    restorer = FaceRestorer(_IdentityCodeFormer(), detector, _SkinParser(), torch.device("cpu"), det_shrink=shrink)
    restorer.face_size = 512  # the published face size: the 640 detection side unscaled
    restorer.detect(np.zeros((900, 1200, 3), np.uint8))
    assert detector.seen == (side, int(1200 * side / 900))
    restorer.detect(np.zeros((512, 512, 3), np.uint8))
    assert detector.seen == (640, 640)


# ------------------------------------------------------------------------------------------------ efficacy


def test_impress_lowers_its_vae_consistency_loss(cli, tmp_path, shared_cache):
    """IMPRESS on PhotoGuard-protected photos (the perturbation built on the same tiny VAE): the consistency
    loss MSE(D(E(x)), x), measured here on the saved 8-bit PNGs with tiny-sd's VAE, falls by a fifth at least
    in 20 iterations. Seen: 0.398 on the protected input → 0.273 after IMPRESS (0.404 → 0.276 when the input
    was ±12-level random-sign noise instead; 0.391 on the clean photos)."""
    from cloak.models.handle import Models

    clean = write_images(tmp_path / "clean", n=2, seed=0)
    r = cli("protect", "--tiny", "-q", "--method", "photoguard", "--eps", "0.1", "--eps-unit", "m11", "--steps", "5",
            clean, tmp_path / "protected")
    assert r.exit_code == 0, r.stderr
    r = cli("purify", "--tiny", "-q", "--json", "--method", "impress", "--seed", "0", "-o", "iterations=20",
            tmp_path / "protected", tmp_path / "purified")
    assert r.exit_code == 0, r.stderr
    vae = Models(cache_dir=shared_cache, tiny=True).sd("sd21-base").vae

    def consistency(folder: Path) -> float:
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(vae(x).sample, x))

    before, after = consistency(tmp_path / "protected"), consistency(tmp_path / "purified")
    print("impress consistency:", {"protected": before, "purified": after})
    assert after < 0.8 * before, (before, after)
