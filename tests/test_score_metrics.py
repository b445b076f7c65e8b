"""`cloak score` metrics: hand-computed references, algorithm parity, and every model-backed metric on its
stand-in through the real loading path (``--tiny``), plus the packaged real weights (MTCNN, BRISQUE's SVR)."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloak.api import Common, run_score
from cloak.score import SCORE
from cloak.score.base import ScoreImage


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _dirs(tmp_path: Path, gen: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[Path, Path]:
    g, r = tmp_path / "gen", tmp_path / "ref"
    for folder, imgs in ((g, gen), (r, ref)):
        for name, arr in imgs.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / f"{name}.png")
    return g, r


def _score(gen, ref, metrics, **opts):
    return run_score(gen, ref=str(ref) if ref else None, metrics=metrics,
                     common=Common(tiny=True, options=opts, argv=[]))


# --- full-reference metrics against hand-computed numbers ---------------------------------------------------

def test_psnr_ssim_linf_hand_computed(tmp_path):
    a = np.full((16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 110, np.uint8)
    gen, ref = _dirs(tmp_path, {"x": b}, {"x": a})
    rep = _score(gen, ref, ["psnr", "ssim", "linf"])
    m = rep.summary["metrics"]
    assert m["psnr"]["mean"] == pytest.approx(20 * np.log10(255 / 10), abs=1e-9)  # MSE = (10/255)²
    assert m["linf"]["mean"] == 10.0
    # Flat images: variances vanish, SSIM = luminance term (2μxμy + C1)/(μx² + μy² + C1).
    mx, my, c1 = 110 / 255, 100 / 255, 0.01**2
    assert m["ssim"]["mean"] == pytest.approx((2 * mx * my + c1) / (mx**2 + my**2 + c1), abs=1e-12)


def test_ssim_matches_scikit_image(astronaut):
    from skimage.metrics import structural_similarity

    from cloak.score.fullref import ssim

    a = astronaut[::4, ::4].astype(np.float64) / 255
    b = _jpeg(astronaut[::4, ::4], 20).astype(np.float64) / 255
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=1.0, channel_axis=2)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-6)


def test_lpips_zero_for_identical_and_positive_for_noise(tmp_path, astronaut):
    small = astronaut[::8, ::8]
    noise = np.random.default_rng(0).integers(-40, 41, small.shape)
    noisy = np.clip(small.astype(int) + noise, 0, 255).astype(np.uint8)
    gen, ref = _dirs(tmp_path, {"same": small, "noisy": noisy}, {"same": small, "noisy": small})
    rep = _score(gen, ref, ["lpips"])
    values = {Path(i.input).stem: i.scores["lpips"] for i in rep.items}
    assert values["same"] == pytest.approx(0.0, abs=1e-6)
    assert values["noisy"] > 1e-4
    assert any(r.id == "tiny-alexnet-imagenet" for r in rep.models)


# --- BRISQUE: the brisque package's numbers from its own model files -----------------------------------------

def _brisque_model():
    from cloak.models.packaged import package_dir
    from cloak.score import brisque

    return brisque.load_model(package_dir("brisque-svm"))


def test_brisque_model_file_parsed():
    model = _brisque_model()
    assert model.sv.shape == (770, 36)  # "total_sv 770" in svm.txt, 36 features
    assert model.gamma == 0.05 and model.rho == pytest.approx(-155.845)


def test_brisque_orders_jpeg_quality(astronaut):
    from cloak.score import brisque

    model = _brisque_model()
    scores = [brisque.score(_jpeg(astronaut, q), model) for q in (90, 30, 5)]
    assert scores[0] < scores[1] < scores[2]  # stronger compression → higher (worse) BRISQUE


def test_brisque_matches_the_brisque_package(astronaut):
    """Same features and SVR output as the PyPI package (its libsvm predict; numpy ≥ 2 needs its features
    converted to floats first, which its own scale step no longer does)."""
    pkg = pytest.importorskip("brisque.brisque")
    import cv2
    import skimage.color

    from cloak.score import brisque

    ref = pkg.BRISQUE(url=False)
    for rgb in (astronaut, _jpeg(astronaut, 10)):
        gray = skimage.color.rgb2gray(rgb)
        half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        feats = np.concatenate([ref.calculate_brisque_features(g, 7, 7 / 6) for g in (gray, half)])
        feats = np.array([float(np.asarray(f).ravel()[0]) for f in feats])
        assert np.abs(brisque.features(rgb) - feats).max() < 1e-9
        assert brisque.score(rgb, _brisque_model()) == pytest.approx(ref.calculate_image_quality_score(feats),
                                                                    abs=1e-6)


def test_brisque_scale_file_is_read_without_classes(tmp_path):
    import pickle

    from cloak.score.brisque import _DataOnly

    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"min_": [0.0], "max_": [1.0], "f": Path("x")}))
    with open(path, "rb") as fh, pytest.raises(pickle.UnpicklingError):
        _DataOnly(fh).load()


# --- AGGD fits and NIQE ----------------------------------------------------------------------------------------

def test_aggd_shape_recovers_gaussian_and_laplacian():
    from cloak.score import brisque, niqe

    rng = np.random.default_rng(0)
    gauss, lap = rng.normal(size=200_000), rng.laplace(size=200_000)
    assert niqe.aggd(gauss)[0] == pytest.approx(2.0, abs=0.05)
    assert niqe.aggd(lap)[0] == pytest.approx(1.0, abs=0.05)
    assert brisque.aggd_fit(gauss)[0] == pytest.approx(2.0, abs=0.05)
    assert brisque.aggd_fit(lap)[0] == pytest.approx(1.0, abs=0.05)


def test_matlab_imresize_half_reproduces_linear_ramps():
    from cloak.score.niqe import imresize_half

    ramp = np.tile(np.arange(64, dtype=np.float64), (64, 1))
    out = imresize_half(ramp)
    assert out.shape == (32, 32)
    # Output pixel i (1-based) samples input position 2i − 0.5, i.e. 0-based 2i − 1.5; cubics keep ramps exact
    # wherever the 8-tap antialiased kernel stays inside the image.
    i = np.arange(3, 30)
    assert np.allclose(out[5, i - 1], 2 * i - 1.5, atol=1e-9)
    assert np.allclose(imresize_half(np.full((20, 12), 7.0)), 7.0)


def test_niqe_is_zero_at_the_pristine_mean_and_grows_away_from_it(astronaut):
    from cloak.score import niqe

    rgb = astronaut[:288, :288]
    gray = niqe.rgb2gray_matlab(rgb)
    # the pristine model equal to this image's own feature mean: distance 0
    feats = _niqe_features(niqe, gray)
    mu, cov = feats.mean(0), np.cov(feats, rowvar=False)
    assert niqe.niqe(rgb, mu, cov) == pytest.approx(0.0, abs=1e-6)
    assert niqe.niqe(rgb, mu + 0.1, cov) > niqe.niqe(rgb, mu + 0.01, cov) > 0
    assert niqe.niqe(astronaut[:100, :150], mu, cov) is None  # one 96² block only


def _niqe_features(niqe, im):
    from scipy import ndimage

    feats = []
    for scale in (1, 2):
        mu = ndimage.correlate(im, niqe._window(), mode="nearest")
        sd = np.sqrt(np.abs(ndimage.correlate(im * im, niqe._window(), mode="nearest") - mu * mu))
        s = (im - mu) / (sd + 1)
        b = 96 // scale
        blocks = [s[r * b:(r + 1) * b, c * b:(c + 1) * b] for c in range(3) for r in range(3)]
        feats.append([niqe.block_features(block) for block in blocks])
        im = niqe.imresize_half(im)
    return np.concatenate([np.array(f) for f in feats], axis=1)


def test_niqe_metric_on_standin_params(tmp_path, astronaut):
    gen, _ = _dirs(tmp_path, {"big": astronaut[:256, :256], "small": astronaut[:64, :64]}, {})
    rep = _score(gen, None, ["niqe"])
    values = {Path(i.input).stem: i.scores["niqe"] for i in rep.items}
    assert values["big"] > 0 and values["small"] is None
    assert rep.summary["metrics"]["niqe"]["extras"]["too_small"] == 1
    assert any(r.id == "tiny-niqe" and r.stand_in for r in rep.models)


# --- CLIP-based metrics on stand-ins ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_images(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("clip")
    gen, _ = _dirs(root, {"a": data.astronaut()[::2, ::2], "b": data.chelsea()}, {})
    return gen


@pytest.mark.parametrize("name", ["liqe", "clipiqa", "clipiqa-c"])
def test_clip_metrics_on_standins_are_in_range_and_deterministic(clip_images, name):
    a = _score(clip_images, None, [name])
    b = _score(clip_images, None, [name])
    lo, hi = a.summary["metrics"][name]["range"]
    values = [i.scores[name] for i in a.items]
    assert values == [i.scores[name] for i in b.items]
    assert all(lo <= v <= hi for v in values)
    assert len(set(values)) == 2  # the two images differ
    assert all(r.stand_in for r in a.models)


def test_clip_checkpoint_layouts_and_refusal(tmp_path):
    """LIQE's original (plain OpenAI state dict) and pyiqa's ({'params': {'clip_model.…'}}) load the same; a
    pickle with objects is refused, not unpickled."""
    from cloak.errors import ModelUnavailableError
    from cloak.models import clip_openai as co

    co.build_standin_liqe(tmp_path / "orig")
    state = torch.load(tmp_path / "orig" / co.LIQE_FILES[0], weights_only=True)
    (tmp_path / "pyiqa").mkdir()
    torch.save({"params": {f"clip_model.{k}": v for k, v in state.items()}}, tmp_path / "pyiqa" / "liqe_mix.pt")
    x = torch.rand(1, 3, 224, 224)
    a = co.load_clip(tmp_path / "orig", co.LIQE_FILES).encode_image(x)
    b = co.load_clip(tmp_path / "pyiqa", co.LIQE_FILES).encode_image(x)
    assert torch.equal(a, b)
    (tmp_path / "bad").mkdir()
    torch.save({"params": state, "note": Path("object")}, tmp_path / "bad" / "LIQE.pt")
    with pytest.raises(ModelUnavailableError):
        co.load_clip(tmp_path / "bad", co.LIQE_FILES)


def test_clipiqa_attention_pool_without_positional_embedding(tmp_path):
    """CLIP-IQA's RN50 pooling is the ordinary attention pool with its positional embedding left out."""
    from cloak.models import clip_openai as co
    from cloak.score.clip_iqa import rn_image_features

    co.build_standin_clip_rn(tmp_path)
    model = co.load_clip(tmp_path)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ours = rn_image_features(model.visual, x)
        assert not torch.allclose(ours, model.visual(x).float(), atol=1e-4)
        model.visual.attnpool.positional_embedding.zero_()
        assert torch.allclose(ours, model.visual(x).float(), atol=1e-5)


def test_liqe_prompts_and_clipiqac_class_option(clip_images):
    from cloak.score.clip_iqa import LIQE_DISTORTIONS, LIQE_QUALITIES, LIQE_SCENES

    assert len(LIQE_QUALITIES) * len(LIQE_SCENES) * len(LIQE_DISTORTIONS) == 495
    rep = _score(clip_images, None, ["clipiqa-c", "liqe"], **{"clipiqa-c.class_name": "person"})
    assert rep.summary["metrics"]["clipiqa-c"]["extras"]["prompt_class"] == "face"  # MetaCloak maps person→face
    assert -1 <= rep.summary["metrics"]["liqe"]["extras"]["liqe_n"] <= 1
    import os

    # the 495 prompt embeddings are kept on disk per checkpoint; the determinism test above reads them back
    assert list((Path(os.environ["CLOAK_CACHE_DIR"]) / "score").glob("liqe-text-*.safetensors"))


# --- SER-FIQ: real MTCNN (facenet-pytorch's weights), stand-in ArcFace ------------------------------------------

@pytest.fixture(scope="module")
def face_dirs(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("faces")
    return _dirs(root, {"portrait": data.astronaut(), "cat": data.chelsea()}, {"portrait": data.astronaut()})


def test_serfiq_needs_a_face_and_is_deterministic(face_dirs):
    gen, _ = face_dirs
    a = _score(gen, None, ["serfiq"], **{"serfiq.passes": "8"})
    b = _score(gen, None, ["serfiq"], **{"serfiq.passes": "8"})
    values = {Path(i.input).stem: i.scores["serfiq"] for i in a.items}
    assert values["cat"] is None  # no face: undefined, skipped in the mean
    assert values["portrait"] is not None and 0 <= values["portrait"] <= 1
    assert [i.scores for i in a.items] == [i.scores for i in b.items]
    assert a.summary["metrics"]["serfiq"]["n"] == 1
    assert any(r.id == "facenet-mtcnn" and not r.stand_in for r in a.models)


def test_serfiq_without_dropout_noise_scores_one(face_dirs):
    """p → 0: the T embeddings coincide, mean distance 0, s = 2/(1+e⁰) = 1 and q = σ(130·0.12) ≈ 1."""
    gen, _ = face_dirs
    rep = _score(gen, None, ["serfiq"], **{"serfiq.passes": "4", "serfiq.dropout": "1e-9"})
    extras = rep.summary["metrics"]["serfiq"]["extras"]
    assert extras["serfiq_raw_mean"] == pytest.approx(1.0, abs=1e-4)
    assert rep.summary["metrics"]["serfiq"]["mean"] == pytest.approx(1 / (1 + np.exp(-130 * 0.12)), abs=1e-4)


def test_mtcnn_real_weights_find_the_astronaut_not_the_cat():
    from skimage import data

    from cloak.models.mtcnn import Mtcnn
    from cloak.models.packaged import package_dir

    det = Mtcnn(package_dir("facenet-mtcnn"))
    faces = det.detect(data.astronaut())
    assert len(faces) >= 1
    x1, y1, x2, y2 = faces[0].box
    assert 150 < (x1 + x2) / 2 < 280 and 60 < (y1 + y2) / 2 < 200  # her face, upper middle
    assert det.detect(data.chelsea()) == []


# --- registry contract ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCORE.names())
def test_every_metric_declares_direction_range_mode_and_source(name):
    cls = SCORE.get(name)
    d = cls.describe()
    assert d["lower_better"] in (True, False) and d["mode"] in ("FR", "NR", "SET")
    assert len(d["range"]) == 2 and isinstance(d["needs_ref"], bool)
    assert cls.implements and cls.paper
    cls.Options()  # defaults validate
    for p in cls.proposals:
        assert p in cls.Options.model_fields


def test_score_image_names_pair(tmp_path):
    from cloak.score.base import pair_by_name

    a = ScoreImage("p/x", "", np.zeros((2, 2, 3), np.uint8))
    r = ScoreImage("x", "", np.zeros((2, 2, 3), np.uint8))
    assert pair_by_name([a], [r], "psnr") == [r]


def test_report_json_has_values_stats_and_models(tmp_path, astronaut):
    gen, ref = _dirs(tmp_path, {"a": _jpeg(astronaut[::4, ::4], 30), "b": astronaut[::4, ::4]},
                     {"a": astronaut[::4, ::4], "b": astronaut[::4, ::4]})
    out = tmp_path / "r" / "scores.json"
    run_score(gen, ref=str(ref), metrics=["psnr", "brisque"], report_path=str(out), common=Common(argv=[]))
    data = json.loads(out.read_text())
    row = data["summary"]["metrics"]["brisque"]
    assert {"mean", "std", "n", "lower_better", "range", "mode", "needs_ref", "seconds_per_image"} <= set(row)
    assert [i["scores"]["psnr"] for i in data["items"]][1] is None  # identical image: +inf → null
    assert any(m["id"] == "brisque-svm" and not m["stand_in"] for m in data["models"])
    assert "implements" in data["method_info"]["metrics"]["brisque"]


def test_packaged_model_missing_package_is_exit_4(monkeypatch):
    from cloak.errors import ModelUnavailableError
    from cloak.models import packaged

    real = importlib.util.find_spec
    monkeypatch.setattr(packaged.importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(ModelUnavailableError) as exc:
        packaged.package_dir("dlib-face")
    assert exc.value.exit_code == 4 and "cloak[dlib]" in str(exc.value)


def test_packaged_models_resolve_to_the_installed_package(tmp_path):
    from cloak.models.cache import pull
    from cloak.models.packaged import package_dir

    for model_id in ("dlib-face", "facenet-mtcnn", "brisque-svm"):
        path = package_dir(model_id)
        assert pull(tmp_path, model_id) == path  # `cloak models pull` downloads nothing for these
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("arch", ["ViT-B-32-quickgelu", "RN50-quickgelu"])
def test_clip_geometry_inferred_from_real_size_state_dicts(arch):
    """OpenAI's ViT-B/32 and RN50 at full size (random weights): the architecture read back from the state dict
    is the one that produced it — same tensors, same outputs."""
    import open_clip

    from cloak.models.clip_openai import build_clip, tokenize

    torch.manual_seed(0)
    ref = open_clip.create_model(arch, pretrained=None).eval()
    ours = build_clip({k: v.clone() for k, v in ref.state_dict().items()})
    x, t = torch.rand(1, 3, 224, 224), tokenize(["a good photo of face"])
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(x), ref.encode_image(x), atol=1e-5)
        assert torch.allclose(ours.encode_text(t), ref.encode_text(t), atol=1e-5)
