"""DiffShortcut's ``-o det_shrink``: whether CodeFormer's face detection also shrinks large images (issue 15 §7)."""

from __future__ import annotations

import pytest
from conftest import write_images

from cloak.api import Common, run_purify


@pytest.mark.parametrize("value, shrunk", [(None, False), ("false", False), ("true", True)])
def test_det_shrink_option_sets_the_detection_size(tmp_path, monkeypatch, value, shrunk):
    """A 200×160 photo (short side above the tiny restorer's detection side, 640 × face_size/512) reaches the
    detector as it is by default ([PROP], the CodeFormer DiffShortcut ran) and shrunk to that side with
    ``-o det_shrink=true`` (CodeFormer today)."""
    from cloak.models.restoration import FaceRestorer

    seen = []
    detect = FaceRestorer.detect

    def spy(self, rgb):
        inner = self.detector.detect_faces

        def record(bgr, **kw):
            seen.append((bgr.shape[:2], round(self.det_short_side * self.scale)))
            return inner(bgr, **kw)

        self.detector.detect_faces = record
        try:
            return detect(self, rgb)
        finally:
            del self.detector.detect_faces

    monkeypatch.setattr(FaceRestorer, "detect", spy)
    images = write_images(tmp_path / "in", n=1, size=(200, 160))
    options = {"sr": "false", "max_faces": 1, **({"det_shrink": value} if value is not None else {})}
    run_purify(images, tmp_path / "out", common=Common(method="diffshortcut", tiny=True, argv=[], options=options))
    ((shape, side),) = seen
    assert side < 160  # the test needs an image larger than the detection side
    assert shape == ((side, round(200 * side / 160)) if shrunk else (160, 200)), (shape, side)


def test_det_shrink_is_validated_and_listed(cli, image_dir, tmp_path):
    r = cli("purify", "--tiny", "--method", "diffshortcut", "-o", "det_shrink=maybe", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "det_shrink" in r.stderr and "unknown option" not in r.stderr, r.stderr
    r = cli("methods", "purify", "diffshortcut")
    assert r.exit_code == 0 and "-o det_shrink=False" in r.stdout, r.stdout
