#!/usr/bin/env python3
"""dlib's face-verification distance between the largest faces of two photos, computed by dlib itself.

dlib's own pipeline (HOG detector, 5-point landmarks, compute_face_descriptor on the raw 128-d descriptors):
two faces are the same person for dlib when their Euclidean distance is below 0.6 (the threshold stored
in the model file). Prints one JSON line: distance, threshold, same_person.

    python examples/dlib_distance.py original.png protected.png
"""

from __future__ import annotations

import json
import sys

import numpy as np
from PIL import Image

THRESHOLD = 0.6  # dlib_face_recognition_resnet_model_v1: loss_metric distance threshold


def descriptor(path: str, models) -> np.ndarray | None:
    detector, predictor, net = models
    rgb = np.asarray(Image.open(path).convert("RGB"))
    rects = detector(rgb, 1)
    if not rects:
        return None
    rect = max(rects, key=lambda r: r.area())
    return np.asarray(net.compute_face_descriptor(rgb, predictor(rgb, rect)))


def main(a: str, b: str) -> None:
    import dlib

    from cloak.models.packaged import package_dir

    root = package_dir("dlib-face")
    models = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(root / "shape_predictor_5_face_landmarks.dat")),
              dlib.face_recognition_model_v1(str(root / "dlib_face_recognition_resnet_model_v1.dat")))
    da, db = descriptor(a, models), descriptor(b, models)
    if da is None or db is None:
        print(json.dumps({"distance": None, "threshold": THRESHOLD, "same_person": False,
                          "no_face": [p for p, d in ((a, da), (b, db)) if d is None]}))
        return
    distance = float(np.linalg.norm(da - db))
    print(json.dumps({"distance": round(distance, 4), "threshold": THRESHOLD, "same_person": distance < THRESHOLD}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
