"""dlib's face-recognition ResNet in torch (cloak.models.archs.dlib_resnet) against dlib itself, on the real
weights of ``face-recognition-models`` and real faces that scikit-image ships: the astronaut (public domain)
and LFW faces (``lfw_subset``, 25×25 grey, upscaled)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

dlib = pytest.importorskip("dlib")
pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def files():
    from cloak.models.packaged import package_dir

    return package_dir("dlib-resnet")


@pytest.fixture(scope="module")
def net(files):
    from cloak.models.archs.dlib_resnet import load_dlib_resnet

    return load_dlib_resnet(files / "dlib_face_recognition_resnet_model_v1.dat")


@pytest.fixture(scope="module")
def reference(files):
    """dlib's own HOG detector, 5-point predictor and face-recognition network."""
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(files / "shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(str(files / "dlib_face_recognition_resnet_model_v1.dat")))


def _faces() -> dict[str, np.ndarray]:
    from skimage import data

    astronaut = data.astronaut()
    faces = {"astronaut": astronaut, "astronaut_flipped": np.ascontiguousarray(astronaut[:, ::-1]),
             "astronaut_307": np.asarray(Image.fromarray(astronaut).resize((307, 307), Image.BICUBIC))}
    lfw = data.lfw_subset()  # the first 100 are faces
    for i in (0, 1, 2):
        grey = Image.fromarray((lfw[i] * 255).round().astype(np.uint8)).resize((200, 200), Image.BICUBIC)
        faces[f"lfw_{i}"] = np.asarray(grey.convert("RGB"))
    return faces


FACES = _faces()


def _shape(reference, img):
    detector, predictor, _ = reference
    rects = detector(img, 1)
    assert len(rects) >= 1, "dlib finds the face"
    return predictor(img, max(rects, key=lambda r: r.area()))


def _points(shape) -> np.ndarray:
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()


def test_reader_reads_the_published_network(files):
    from cloak.models.archs.dlib_resnet import ANET_SPEC, read_dlib_net

    net = read_dlib_net(files / "dlib_face_recognition_resnet_model_v1.dat")
    assert net.loss["distance_threshold"] == pytest.approx(0.6, abs=1e-6)  # dlib's same-person threshold
    assert net.loss["margin"] == pytest.approx(0.04, abs=1e-6)
    assert net.input_size == (150, 150)
    assert net.input_mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert len(net.layers) == sum(op[0] not in ("tag", "skip") for op in ANET_SPEC) == 108
    convs = [r for r in net.layers if r.kind.startswith("con")]
    assert len(convs) == 29 and convs[0].values["filters"] == 32 and convs[0].values["nr"] == 7
    assert net.layers[-1].kind.startswith("fc") and net.layers[-1].params.size == 256 * 128


def test_reader_rejects_truncated_and_other_files(files, tmp_path):
    from cloak.models.archs.dlib_resnet import DatFormatError, load_dlib_resnet, read_dlib_net

    data = (files / "dlib_face_recognition_resnet_model_v1.dat").read_bytes()
    cut = tmp_path / "cut.dat"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatFormatError, match="truncated"):
        read_dlib_net(cut)
    with pytest.raises(DatFormatError):  # a shape predictor is not a network
        load_dlib_resnet(files / "shape_predictor_5_face_landmarks.dat")
    longer = tmp_path / "longer.dat"
    longer.write_bytes(data + b"\x00")
    with pytest.raises(DatFormatError, match="left after"):
        read_dlib_net(longer)


@pytest.mark.parametrize("name", sorted(FACES))
def test_torch_descriptor_equals_dlib_on_the_same_chip(name, net, reference):
    """Same 150² chip (dlib's get_face_chip) → the same 128-d descriptor as compute_face_descriptor."""
    img = FACES[name]
    chip = dlib.get_face_chip(img, _shape(reference, img), 150, 0.25)
    expected = np.asarray(reference[2].compute_face_descriptor(chip), dtype=np.float64)
    with torch.no_grad():
        got = net(_chw(chip))[0].double().numpy()
    assert np.abs(got - expected).max() <= 1e-4
    assert got @ expected / np.linalg.norm(got) / np.linalg.norm(expected) >= 0.99999


@pytest.mark.parametrize("name", ["astronaut", "astronaut_flipped", "astronaut_307", "lfw_1"])
def test_differentiable_chip_matches_dlib_get_face_chip(name, reference):
    """The resampled chip equals dlib's up to its rounding down to uint8: floor(ours) == dlib's chip."""
    from cloak.models.archs.dlib_resnet import extract_chips, face_chip_matrix

    img = FACES[name]
    shape = _shape(reference, img)
    expected = dlib.get_face_chip(img, shape, 150, 0.25).astype(np.float64)
    x = _chw(img).double().requires_grad_(True)
    chip = extract_chips(x, [face_chip_matrix(_points(shape))])
    ours = chip[0].permute(1, 2, 0).detach().numpy()
    diff = ours - expected
    assert diff.min() > -1e-6 and diff.max() < 1 + 1e-6  # within one 8-bit level (dlib truncates)
    assert np.mean(np.floor(ours + 1e-6) == expected) > 0.999
    chip[..., 75, 75].sum().backward()  # the centre pixel depends on the 2×2 image pixels around its position
    touched = x.grad[0].abs().sum(0).nonzero()
    assert 1 <= len(touched) <= 4


def test_dlib_encoder_aligns_like_dlib_and_embeds_like_dlib(tmp_path, reference):
    """The encoder DLADiff attacks: dlib landmarks on the clean image, chip, descriptor ≈ dlib's pipeline."""
    from cloak.models.encoders import load_identity_encoder
    from cloak.models.handle import Models

    # --tiny replaces nothing here: the packaged weights are real and have no stand-in
    models = Models(cache_dir=tmp_path, device="cpu", dtype=torch.float32, tiny=True, overrides={})
    enc = load_identity_encoder(models, "dlib-resnet")
    img = FACES["astronaut"]
    x = _chw(img) / 127.5 - 1
    view = enc.face_view(x, None)
    assert view.sources == ["dlib"] and enc.input_size == 150
    with torch.no_grad():
        ours = enc(view(x))[0].double().numpy()
    expected = np.asarray(reference[2].compute_face_descriptor(img, _shape(reference, img)), dtype=np.float64)
    # only dlib's rounding of the chip to uint8 differs
    assert np.linalg.norm(ours - expected) < 0.02
    assert [r.id for r in models.records()] == ["dlib-resnet"] and not models.records()[0].stand_in


def test_dladiff_layer_zs_against_dlib_loads_no_diffusion_model(cli, tmp_path, astronaut):
    """-o layers=zs: no sd21-base (not installed here) is asked for; the report names the attacked encoder."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(astronaut).save(src / "astronaut.png")
    res = cli("protect", str(src), str(tmp_path / "out"), "--method", "dladiff", "-o", "layers=zs",
              "-o", "encoders=dlib-resnet", "-o", "zs_steps=1", "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert [m["id"] for m in rep["models"]] == ["dlib-resnet"]
    zs = rep["summary"]["layer_zs"]
    assert zs["encoders"] == ["dlib-resnet"] and zs["faces_found"] == 1
    assert "white-box" in zs["white_box"][0] and "dlib" in zs["white_box"][0]
    item = rep["items"][0]
    assert item["zs_face"] == {"dlib-resnet": "dlib"}
    assert item["identity_cos"]["dlib-resnet"] < item["identity_cos_before_zs"]["dlib-resnet"] == pytest.approx(1.0)
    out = np.asarray(Image.open(tmp_path / "out" / "astronaut.png"))
    assert out.shape == astronaut.shape  # native size: no model resolution applies
    assert np.abs(out.astype(int) - astronaut).max() <= 8


def _dlib_descriptor(reference, rgb: np.ndarray) -> np.ndarray:
    return np.asarray(reference[2].compute_face_descriptor(rgb, _shape(reference, rgb)), dtype=np.float64)


def test_layer_zs_against_dlib_changes_who_dlib_sees_far_more_than_noise(cli, tmp_path, astronaut, reference):
    """The real effect, measured by dlib itself on the saved 8-bit PNG (astronaut, native 512², ε = 8/255).

    5 PGD steps of 1/255 against dlib-resnet: dlib distance to the original 0.77 (> 0.6: another person for
    dlib), cosine 0.865, PSNR 50 dB. ±8/255 random-sign noise (PSNR 30 dB): distance 0.14, cosine 0.995.
    (100 steps, the default: distance 1.09, PSNR 44 dB.) White-box: the attacked network is the measuring one.
    """
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(astronaut).save(src / "astronaut.png")
    res = cli("protect", str(src), str(tmp_path / "out"), "--method", "dladiff", "-o", "layers=zs",
              "-o", "encoders=dlib-resnet", "-o", "zs_steps=5", "-o", "eps_zs=8/255", "-o", "alpha_zs=1/255")
    assert res.exit_code == 0, res.stderr
    protected = np.array(Image.open(tmp_path / "out" / "astronaut.png").convert("RGB"))
    noise = np.random.default_rng(0).choice([-8, 8], size=astronaut.shape)
    noisy = np.clip(astronaut.astype(int) + noise, 0, 255).astype(np.uint8)
    clean = _dlib_descriptor(reference, astronaut)

    def distance_cos(rgb):
        d = _dlib_descriptor(reference, rgb)
        return float(np.linalg.norm(d - clean)), float(d @ clean / np.linalg.norm(d) / np.linalg.norm(clean))

    (d_attack, cos_attack), (d_noise, cos_noise) = distance_cos(protected), distance_cos(noisy)
    assert np.abs(protected.astype(int) - astronaut).max() <= 8
    psnr = 10 * np.log10(255 ** 2 / np.mean((protected.astype(float) - astronaut) ** 2))
    assert psnr >= 35
    assert d_attack > 0.6 > 0.3 > d_noise  # not the same person for dlib; noise leaves the identity
    assert 1 - cos_attack > 10 * (1 - cos_noise)
