"""The dlib identity backend on real weights (face-recognition-models, installed offline from PyPI) and real
photos that scikit-image ships: the astronaut (a public-domain portrait) and chelsea (a cat)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cloak.api import Common, run_score

pytest.importorskip("dlib")
pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("dlib")
    portrait = data.astronaut()
    buf = io.BytesIO()
    Image.fromarray(portrait).save(buf, "JPEG", quality=40)
    (root / "gen").mkdir()
    (root / "ref").mkdir()
    Image.open(buf).convert("RGB").save(root / "gen" / "portrait_jpeg.png")
    Image.fromarray(data.chelsea()).save(root / "gen" / "cat.png")
    Image.fromarray(portrait).save(root / "ref" / "portrait.png")
    return root / "gen", root / "ref"


def _by_stem(rep, metric):
    return {Path(i.input).stem: i.scores[metric] for i in rep.items}


def test_dlib_ism_high_on_jpeg_copy_and_fdfr_one_on_cat(photos):
    gen, ref = photos
    # Real weights: no --tiny needed, and none are replaced under --tiny either (packaged weights are real).
    rep = run_score(gen, ref=str(ref), metrics=["fdfr", "ism"],
                    common=Common(tiny=True, options={"fdfr.backend": "dlib", "ism.backend": "dlib"}, argv=[]))
    ism, fdfr = _by_stem(rep, "ism"), _by_stem(rep, "fdfr")
    assert ism["portrait_jpeg"] > 0.9  # same identity through JPEG-40
    assert ism["cat"] == 0.0  # no face → 0 (ISM_all0)
    assert fdfr == {"portrait_jpeg": 0.0, "cat": 1.0}
    m = rep.summary["metrics"]
    assert m["ism"]["extras"]["backend"] == m["fdfr"]["extras"]["backend"] == "dlib-hog-resnet128"
    assert m["ism"]["extras"]["ism_det"] == pytest.approx(ism["portrait_jpeg"])
    assert m["fdfr"]["extras"]["fdr"] == pytest.approx(0.5)
    record = [r for r in rep.models if r.id == "dlib-face"]
    assert record and not record[0].stand_in
    assert rep.summary["stand_in"] is False  # no random stand-in took part


def test_dlib_identity_separates_people(photos, tmp_path):
    """A different face (skimage's camera man is not the astronaut) scores clearly below the JPEG copy."""
    from skimage import data

    from cloak.models.dlib_faces import DlibFaceAnalyzer
    from cloak.models.packaged import package_dir

    an = DlibFaceAnalyzer(package_dir("dlib-face"))
    a = an.embed_largest(data.astronaut())
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "JPEG", quality=40)
    b = an.embed_largest(np.asarray(Image.open(buf).convert("RGB")))
    assert a is not None and b is not None and abs(np.linalg.norm(a) - 1) < 1e-5
    camera = np.stack([data.camera()] * 3, axis=-1)
    c = an.embed_largest(camera)
    assert float(a @ b) > 0.95
    if c is not None:  # the camera man's face is small and in profile; when found, it is someone else
        assert float(a @ c) < float(a @ b) - 0.05
    assert an.detect(data.chelsea()) == []
    whole = an.embed_whole(data.chelsea())
    assert whole.shape == (128,)


def test_ims_on_dlib_hand_checkable(photos):
    """w_ip=0, w_vgg=1: IMS = IMS_VGG. The JPEG copy matches its reference (cosine distance under dlib's 0.07);
    the cat matches nothing → the code's distance 2 → IMS −1."""
    gen, ref = photos
    opts = {"ims.ip_backend": "dlib", "ims.vgg_backend": "dlib", "ims.w_ip": "0", "ims.w_vgg": "1"}
    rep = run_score(gen, ref=str(ref), metrics=["ims"], common=Common(options=opts, argv=[]))
    ims = _by_stem(rep, "ims")
    assert ims["cat"] == pytest.approx(-1.0)
    assert ims["portrait_jpeg"] > 0.93
    extras = rep.summary["metrics"]["ims"]["extras"]
    assert extras["vgg_threshold"] == 0.07 and extras["vgg_backend"] == "dlib-hog-resnet128"
    # default weights 0.7/0.3 combine the two parts
    rep2 = run_score(gen, ref=str(ref), metrics=["ims"], common=Common(options={
        "ims.ip_backend": "dlib", "ims.vgg_backend": "dlib"}, argv=[]))
    ims2 = _by_stem(rep2, "ims")
    assert ims2["cat"] == pytest.approx(0.7 * 0.0 + 0.3 * -1.0)
