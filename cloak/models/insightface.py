"""insightface ``buffalo_l`` face analysis, written in cloak: SCRFD detection, 5-point alignment, ArcFace embedding.

IP-Adapter-FaceID was trained on ``faces[0].normed_embedding`` of insightface's
``FaceAnalysis("buffalo_l")`` with ``det_size=(640, 640)`` [C: h94/IP-Adapter-FaceID model card,
tencent-ailab/IP-Adapter README]. This module runs the two released ONNX graphs of that pack with
onnxruntime and does the pre- and post-processing itself, following insightface's python package
[C: deepinsight/insightface python-package ``model_zoo/scrfd.py``, ``model_zoo/arcface_onnx.py``,
``utils/face_align.py``, ``app/face_analysis.py``]:

* detector ``det_10g.onnx`` (SCRFD-10GF with keypoints): the image is resized, keeping its aspect
  ratio, into a 640×640 canvas (bilinear, zero padding right and bottom) and fed as (x − 127.5)/128.
  Nine outputs, in order: scores (N×1) for strides 8, 16, 32, then box distances (N×4), then keypoint
  offsets (N×10), both in units of the stride; N = 2 anchors × (H/s)·(W/s), anchors ordered by row,
  column, anchor. Each anchor sits on its grid point (x·s, y·s): box = centre ∓ distances (left, top,
  right, bottom), keypoint k = centre + offset k. Scores ≥ 0.5 are kept, greedy NMS at IoU 0.4 (with
  insightface's +1 pixel area convention), faces ordered by score: ``faces[0]``, the face FaceID
  embeds, is the most confident one, not the largest.
* alignment (``norm_crop``): the least-squares similarity transform (Umeyama) of the 5 keypoints onto
  the ArcFace 112×112 template, then a bilinear affine warp with zero border.
* recognizer ``w600k_r50.onnx`` (IResNet-50 trained on WebFace600K): the 112² crop as
  (x − 127.5)/127.5 — graphs that open with their own Sub and Mul (mxnet conversions) get raw 0–255
  instead, the rule insightface applies — giving a 512-d embedding; FaceID takes it ℓ2-normalised.

insightface reads images with OpenCV (BGR) and builds its input blobs with ``swapRB``: both networks
see RGB, which is what cloak holds, so nothing is swapped here. Resizing and warping use OpenCV, as
insightface does, so the networks see the same pixels.

Weights: catalog ids ``insightface-scrfd-10g`` and ``insightface-w600k-r50`` (random stand-ins with
the same input/output contract: ``tiny-scrfd-10g``, ``tiny-w600k-r50``). insightface's pretrained
models are licensed for non-commercial research use only. Needs ``pip install 'cloak[faceid]'``
(onnxruntime, and onnx to read graphs); without it every entry point raises an exit-4 error that
names the extra — there is no fallback to another embedder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cloak.adversarial.identity import Region, crop_resize
from cloak.adversarial.resample import grid_sample
from cloak.errors import ModelUnavailableError
from cloak.models.encoders import IdentityEncoder
from cloak.models.faces import Face

DETECTOR_ID = "insightface-scrfd-10g"
RECOGNIZER_ID = "insightface-w600k-r50"
DETECTOR_FILE = "det_10g.onnx"
RECOGNIZER_FILE = "w600k_r50.onnx"
PACK_DIR = "models/buffalo_l"  # where the hub re-host keeps the files; an unzipped buffalo_l.zip has them at top level
EXTRA_HINT = "pip install 'cloak[faceid]' (installs onnxruntime and onnx; onnxruntime-gpu works too)"

# ArcFace's 5-point template in a 112×112 crop: eye centres (left, right in the image), nose tip, mouth corners.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
CROP_SIZE = 112
DET_SIZE = (640, 640)  # (width, height) FaceAnalysis.prepare(det_size=...) in the FaceID recipe
DET_MEAN, DET_STD = 127.5, 128.0
STRIDES = (8, 16, 32)
ANCHORS_PER_POINT = 2
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4


# --- optional dependencies ----------------------------------------------------------------------------------

def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ModelUnavailableError("the insightface buffalo_l face models (FaceID's embedder) need onnxruntime",
                                    hint=EXTRA_HINT) from None
    return onnxruntime


def import_onnx():
    try:
        import onnx
    except ImportError:
        raise ModelUnavailableError("reading the insightface buffalo_l graphs needs the onnx package",
                                    hint=EXTRA_HINT) from None
    return onnx


def model_file(model_dir: Path, name: str, model_id: str) -> Path:
    """``name`` inside a model directory: the hub layout (``models/buffalo_l/``) or an unzipped pack."""
    model_dir = Path(model_dir)
    for candidate in (model_dir / PACK_DIR / name, model_dir / name):
        if candidate.is_file():
            return candidate
    raise ModelUnavailableError(f"{name} is missing in {model_dir} (model {model_id})",
                                hint=f"run `cloak models pull {model_id}`, or point [models].{model_id} in cloak.toml "
                                     "at an unzipped insightface buffalo_l folder")


def session(path: Path, device: str = "cpu"):
    """An onnxruntime session on the CUDA provider when ``device`` is a CUDA device and the installed
    onnxruntime has it (onnxruntime-gpu), on the CPU provider otherwise."""
    ort = import_onnxruntime()
    dev = torch.device(device)
    providers: list = ["CPUExecutionProvider"]
    if dev.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev.index or 0}))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())  # cloak's thread budget, not every core
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ModelUnavailableError(f"cannot load ONNX model {path}: {exc}") from None


# --- alignment ------------------------------------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2×3 matrix M of the similarity (scale, rotation, translation) that maps ``src`` points onto
    ``dst`` points with least squared error (Umeyama 1991; no reflection)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src0, dst0 = src - mu_src, dst - mu_dst
    cov = dst0.T @ src0 / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map is a reflection: flip the weakest axis
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    var_src = (src0 ** 2).sum() / len(src)
    if var_src == 0:
        raise ValueError("all landmarks coincide: no similarity transform")
    scale = float((sigma * d).sum() / var_src)
    shift = mu_dst - scale * rotation @ mu_src
    return np.hstack([scale * rotation, shift[:, None]])


def alignment_matrix(landmarks: np.ndarray) -> np.ndarray:
    """The map from image coordinates to the 112² ArcFace crop for 5 landmarks (insightface estimate_norm)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected 5×2 landmarks, got {landmarks.shape}")
    return similarity_transform(landmarks, ARCFACE_TEMPLATE)


def norm_crop(rgb: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The aligned ``size``² crop (uint8 H×W×3) for 5 landmarks: bilinear warp, black outside the image."""
    import cv2

    if size != CROP_SIZE:
        raise ValueError("the ArcFace template is defined for 112×112 crops")
    matrix = alignment_matrix(landmarks)
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (size, size), borderValue=0.0)


# --- SCRFD ----------------------------------------------------------------------------------------------------

def anchor_centres(height: int, width: int, stride: int, anchors: int = ANCHORS_PER_POINT) -> np.ndarray:
    """(height·width·anchors)×2 anchor centres (x, y) in input pixels, by row, column, then anchor."""
    ys, xs = np.mgrid[:height, :width]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, anchors, axis=0)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy non-maximum suppression, highest score first; box areas count the end pixel (w = x2 − x1 + 1)
    as insightface's SCRFD does."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[best] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return keep


def decode_scrfd(outputs: list[np.ndarray], input_hw: tuple[int, int], *, threshold: float = SCORE_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faces from SCRFD's nine raw outputs for an input of ``input_hw`` pixels: boxes (F×4, x1 y1 x2 y2),
    scores (F) and keypoints (F×5×2), in input pixels, highest score first, after thresholding and NMS.

    Outputs may carry a leading batch axis of 1 (some exports do); it is dropped."""
    n_levels = len(STRIDES)
    if len(outputs) != 3 * n_levels:
        raise ModelUnavailableError(f"a SCRFD detector with keypoints has {3 * n_levels} outputs, this one has "
                                    f"{len(outputs)}")
    height, width = input_hw
    boxes, scores, keypoints = [], [], []
    for level, stride in enumerate(STRIDES):
        score, dist, kps = (np.asarray(outputs[level + k * n_levels], dtype=np.float32) for k in range(3))
        if score.ndim == 3:
            score, dist, kps = score[0], dist[0], kps[0]
        centres = anchor_centres(height // stride, width // stride, stride)
        if not (len(score) == len(dist) == len(kps) == len(centres)):
            raise ModelUnavailableError(f"SCRFD output sizes at stride {stride} ({len(score)}, {len(dist)}, "
                                        f"{len(kps)}) do not match its {len(centres)} anchors")
        keep = score.reshape(-1) >= threshold
        c, d = centres[keep], dist[keep] * stride
        boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
        keypoints.append(c[:, None, :] + kps[keep].reshape(-1, 5, 2) * stride)
        scores.append(score.reshape(-1)[keep])
    boxes_all, scores_all, kps_all = np.concatenate(boxes), np.concatenate(scores), np.concatenate(keypoints)
    keep = nms(boxes_all, scores_all, nms_threshold)
    return boxes_all[keep], scores_all[keep], kps_all[keep]


def letterbox(rgb: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The image resized (aspect kept, bilinear) into a ``size`` = (width, height) canvas at its top-left
    corner, zero elsewhere, and the scale from image to canvas pixels."""
    import cv2

    h, w = rgb.shape[:2]
    canvas_w, canvas_h = size
    if h / w > canvas_h / canvas_w:
        new_h, new_w = canvas_h, int(canvas_h / (h / w))
    else:
        new_w, new_h = canvas_w, int(canvas_w * (h / w))
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(np.ascontiguousarray(rgb), (new_w, new_h))
    return canvas, new_h / h


class SCRFDDetector:
    """SCRFD on onnxruntime: RGB uint8 image → faces (box, score, 5 keypoints) in image pixels."""

    def __init__(self, sess, det_size: tuple[int, int] = DET_SIZE, threshold: float = SCORE_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD):
        self.session = sess
        inp = sess.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in sess.get_outputs()]
        if len(self.output_names) != 3 * len(STRIDES):
            raise ModelUnavailableError(f"expected a SCRFD detector with keypoints ({3 * len(STRIDES)} outputs), got "
                                        f"{len(self.output_names)} outputs")
        # A graph with a fixed input size wins over det_size, as in insightface.
        fixed = inp.shape[2:4]
        self.input_size = (int(fixed[1]), int(fixed[0])) if all(isinstance(v, int) for v in fixed) else tuple(det_size)
        self.threshold = threshold
        self.nms_threshold = nms_threshold

    def detect(self, rgb: np.ndarray) -> list[Face]:
        canvas, scale = letterbox(rgb, self.input_size)
        blob = ((canvas.astype(np.float32) - DET_MEAN) / DET_STD).transpose(2, 0, 1)[None]
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        boxes, scores, kps = decode_scrfd(outputs, canvas.shape[:2], threshold=self.threshold,
                                          nms_threshold=self.nms_threshold)
        return [Face(b / scale, float(s), k / scale) for b, s, k in zip(boxes, scores, kps)]


class ArcFaceRecognizer:
    """An insightface ArcFace ONNX graph: aligned 112² RGB crops → raw embeddings."""

    def __init__(self, sess, input_mean: float = 127.5, input_std: float = 127.5):
        self.session = sess
        inp = sess.get_inputs()[0]
        self.input_name = inp.name
        outputs = sess.get_outputs()
        if len(outputs) != 1:
            raise ModelUnavailableError(f"expected a recognizer with one output, got {len(outputs)}")
        self.output_name = outputs[0].name
        h, w = inp.shape[2:4]
        self.input_size = (int(w), int(h)) if isinstance(h, int) and isinstance(w, int) else (CROP_SIZE, CROP_SIZE)
        self.input_mean, self.input_std = input_mean, input_std

    def preprocess(self, crops: list[np.ndarray]) -> np.ndarray:
        import cv2

        batch = [c if c.shape[1::-1] == self.input_size else cv2.resize(c, self.input_size) for c in crops]
        blob = (np.stack(batch).astype(np.float32) - self.input_mean) / self.input_std
        return np.ascontiguousarray(blob.transpose(0, 3, 1, 2))

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """Raw (not normalised) embeddings, N×D float32, one crop at a time when the graph's batch is fixed."""
        blob = self.preprocess(crops)
        batch_dim = self.session.get_inputs()[0].shape[0]
        if isinstance(batch_dim, int):
            out = [self.session.run([self.output_name], {self.input_name: blob[i:i + 1]})[0] for i in range(len(blob))]
            return np.concatenate(out).reshape(len(blob), -1).astype(np.float32)
        out = self.session.run([self.output_name], {self.input_name: blob})[0]
        return out.reshape(len(blob), -1).astype(np.float32)


def input_normalisation(path: Path) -> tuple[float, float]:
    """(mean, std) insightface applies before a recognition graph: (0, 1) when the graph normalises itself
    (a Sub and a Mul among its first 8 nodes, as mxnet conversions have), (127.5, 127.5) otherwise."""
    onnx = import_onnx()
    graph = onnx.load(str(path), load_external_data=False).graph
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def normed(embeddings: np.ndarray) -> np.ndarray:
    """Rows ℓ2-normalised (insightface ``Face.normed_embedding``): what IP-Adapter-FaceID takes."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


class BuffaloFaceAnalyzer:
    """insightface FaceAnalysis("buffalo_l") for identity: SCRFD faces (most confident first), norm_crop,
    ArcFace w600k_r50 embeddings."""

    backend = "insightface-buffalo_l"
    embedding_dim = 512

    def __init__(self, detector: SCRFDDetector, recognizer: ArcFaceRecognizer):
        self.detector = detector
        self.recognizer = recognizer

    @property
    def providers(self) -> list[str]:
        return list(self.recognizer.session.get_providers())

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 H×W×3 image, most confident first (insightface's order)."""
        return self.detector.detect(rgb)

    def align(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        return norm_crop(rgb, face.landmarks)

    def embed_aligned(self, crops: list[np.ndarray]) -> np.ndarray:
        """ℓ2-normalised embeddings (N×512) of aligned 112² RGB crops."""
        if not crops:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return normed(self.recognizer.embed(crops))

    def embed_first(self, rgb: np.ndarray) -> np.ndarray | None:
        """``faces[0].normed_embedding``: the most confident face's, None when no face is found."""
        faces = self.detect(rgb)
        if not faces:
            return None
        return self.embed_aligned([self.align(rgb, faces[0])])[0]


def load_analyzer(models, role: str = "faceid", det_size: tuple[int, int] = DET_SIZE) -> BuffaloFaceAnalyzer:
    """The buffalo_l detector and recognizer from the cache (their stand-ins under --tiny), once per run."""
    import_onnxruntime()
    det_id, det_dir, _ = models.resolve(DETECTOR_ID, f"{role}-detector")
    rec_id, rec_dir, _ = models.resolve(RECOGNIZER_ID, f"{role}-embedder")
    det_path = model_file(det_dir, DETECTOR_FILE, det_id)
    rec_path = model_file(rec_dir, RECOGNIZER_FILE, rec_id)
    device = str(models.device)

    def build() -> BuffaloFaceAnalyzer:
        detector = SCRFDDetector(session(det_path, device), det_size=det_size)
        mean, std = input_normalisation(rec_path)
        return BuffaloFaceAnalyzer(detector, ArcFaceRecognizer(session(rec_path, device), mean, std))

    return models.memo(("insightface-buffalo_l", str(det_path), str(rec_path), device, tuple(det_size)), build)


# --- stand-ins (--tiny): random graphs with det_10g's and w600k_r50's input/output contract ----------------------

STANDIN_SEED = 23
SCORE_BIAS = -2.0


def _initializer(onnx, name: str, array: np.ndarray):
    return onnx.numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def scrfd_standin_graph(seed: int = STANDIN_SEED, width: int = 8, batched: bool = False):
    """An ONNX model shaped like det_10g: input ``input.1`` 1×3×H×W (H, W free), nine outputs — scores
    N×1 (sigmoid), box distances N×4 (non-negative), keypoint offsets N×10 — for strides 8, 16, 32 with 2
    anchors per grid point, in det_10g's output order; ``batched`` adds the leading batch axis some exports
    have. One strided convolution and three 1×1 heads per stride, seeded random weights."""
    onnx = import_onnx()
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    heads: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for stride in STRIDES:
        w = rng.normal(0, (3 * stride * stride) ** -0.5, (width, 3, stride, stride))
        # Zero-mean kernels respond to texture only: the flat zero padding of the canvas scores sigmoid(bias) < 0.5
        # and finds no face, the image's own structure does.
        w -= w.mean(axis=(1, 2, 3), keepdims=True)
        inits += [_initializer(onnx, f"w{stride}", w), _initializer(onnx, f"b{stride}", np.zeros(width))]
        nodes.append(helper.make_node("Conv", ["input.1", f"w{stride}", f"b{stride}"], [f"f{stride}"],
                                      strides=[stride, stride], kernel_shape=[stride, stride]))
        nodes.append(helper.make_node("Relu", [f"f{stride}"], [f"r{stride}"]))
        for head, per_anchor, act in (("score", 1, "Sigmoid"), ("bbox", 4, "Softplus"), ("kps", 10, None)):
            channels = ANCHORS_PER_POINT * per_anchor
            hw = rng.normal(0, width ** -0.5, (channels, width, 1, 1))
            if head == "score":  # more texture, higher score; only the strongest responses pass 0.5
                hw = 3 * np.abs(hw)
            bias = np.full(channels, {"score": SCORE_BIAS, "bbox": 0.5, "kps": 0.0}[head])
            inits += [_initializer(onnx, f"{head}{stride}_w", hw), _initializer(onnx, f"{head}{stride}_b", bias)]
            out = f"{head}{stride}_conv"
            nodes.append(helper.make_node("Conv", [f"r{stride}", f"{head}{stride}_w", f"{head}{stride}_b"], [out]))
            if act:
                nodes.append(helper.make_node(act, [out], [f"{out}_act"]))
                out = f"{out}_act"
            # N×C×h×w → N×h×w×C → (h·w·anchors)×per_anchor: anchors ordered by row, column, anchor.
            nodes.append(helper.make_node("Transpose", [out], [f"{out}_t"], perm=[0, 2, 3, 1]))
            shape_name = f"{head}{stride}_shape"
            inits.append(onnx.numpy_helper.from_array(
                np.array([1, -1, per_anchor] if batched else [-1, per_anchor], dtype=np.int64), shape_name))
            name = f"{head}_{stride}"
            nodes.append(helper.make_node("Reshape", [f"{out}_t", shape_name], [name]))
            heads[head].append(name)
    order = heads["score"] + heads["bbox"] + heads["kps"]
    sizes = {"score": 1, "bbox": 4, "kps": 10}
    outputs = []
    for name in order:
        head, stride = name.split("_")
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                     ([1] if batched else []) + [f"n{stride}", sizes[head]]))
    graph = helper.make_graph(nodes, "scrfd_standin",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
                              outputs, initializer=inits)
    return _model(helper, graph)


def arcface_standin_graph(seed: int = STANDIN_SEED + 1, width: int = 8, dim: int = 512,
                          normalises_input: bool = False):
    """An ONNX model shaped like w600k_r50: input ``input.1`` N×3×112×112, one output N×``dim``. A
    miniature IResNet with w600k_r50's operator set — Conv, BatchNormalization, PRelu, a residual Add,
    Flatten, Gemm and the final 1-d BatchNormalization — and seeded random weights. ``normalises_input``
    opens the graph with Sub and Mul nodes, as insightface's mxnet conversions do."""
    onnx = import_onnx()
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def add(name, array):
        inits.append(_initializer(onnx, name, array))
        return name

    def bn(x, out, channels):
        nodes.append(helper.make_node(
            "BatchNormalization", [x, add(f"{out}_g", rng.uniform(0.5, 1.5, channels)),
                                   add(f"{out}_b", rng.normal(0, 0.1, channels)),
                                   add(f"{out}_m", rng.normal(0, 0.1, channels)),
                                   add(f"{out}_v", rng.uniform(0.5, 1.5, channels))], [out], epsilon=1e-5))
        return out

    def conv(x, out, c_in, c_out, stride):
        w = add(f"{out}_w", rng.normal(0, (9 * c_in) ** -0.5, (c_out, c_in, 3, 3)))
        nodes.append(helper.make_node("Conv", [x, w], [out], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                      strides=[stride, stride]))
        return out

    def prelu(x, out, channels):
        nodes.append(helper.make_node("PRelu", [x, add(f"{out}_a", np.full((channels, 1, 1), 0.25))], [out]))
        return out

    x = "input.1"
    if normalises_input:
        nodes.append(helper.make_node("Sub", [x, add("Sub_mean", np.full((1, 3, 1, 1), 127.5))], ["Sub_0"],
                                     name="Sub_0"))
        nodes.append(helper.make_node("Mul", ["Sub_0", add("Mul_scale", np.full((1, 3, 1, 1), 1 / 127.5))],
                                      ["Mul_1"], name="Mul_1"))
        x = "Mul_1"
    x = prelu(bn(conv(x, "stem", 3, width, 2), "stem_bn", width), "stem_act", width)  # 56²
    # One IBasicBlock (bn → conv → bn → prelu → conv(stride 2) → bn) plus a strided 1×1 shortcut.
    y = bn(x, "blk_bn1", width)
    y = prelu(bn(conv(y, "blk_c1", width, width, 1), "blk_bn2", width), "blk_act", width)
    y = bn(conv(y, "blk_c2", width, width, 2), "blk_bn3", width)  # 28²
    sc_w = add("sc_w", rng.normal(0, width ** -0.5, (width, width, 1, 1)))
    nodes.append(helper.make_node("Conv", [x, sc_w], ["sc"], strides=[2, 2]))
    nodes.append(helper.make_node("Add", [y, bn("sc", "sc_bn", width)], ["blk_out"]))
    x = bn("blk_out", "final_bn", width)
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))
    features = width * 28 * 28
    nodes.append(helper.make_node("Gemm", ["flat", add("fc_w", rng.normal(0, features ** -0.5, (dim, features))),
                                           add("fc_b", np.zeros(dim))], ["fc"], transB=1))
    bn("fc", "embedding", dim)
    graph = helper.make_graph(nodes, "arcface_standin",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
                              initializer=inits)
    return _model(helper, graph)


def _model(helper, graph):
    # IR version 8 / opset 13: loadable by every onnxruntime the faceid extra allows (>= 1.16).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="cloak-standin",
                             ir_version=8)


def _save(model, path: Path) -> None:
    onnx = import_onnx()
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def build_standin_scrfd(target: Path) -> None:
    _save(scrfd_standin_graph(), Path(target) / DETECTOR_FILE)


def build_standin_arcface(target: Path) -> None:
    _save(arcface_standin_graph(), Path(target) / RECOGNIZER_FILE)


# --- differentiable recognizer (DLADiff layer 2) ------------------------------------------------------------------

def warp_crops(images, matrices, size: int = CROP_SIZE):
    """Bilinear ``size``² crops of each image (3×h×w tensors) through the image → crop matrices (2×3), zero
    outside the image: ``cv2.warpAffine`` (as norm_crop uses it) written with ``grid_sample``, so
    differentiable in the images. Pixel centres sit at integer coordinates in both."""
    grid_uv = torch.stack(torch.meshgrid(torch.arange(size, dtype=torch.float64),
                                         torch.arange(size, dtype=torch.float64), indexing="xy"), -1)  # (u, v)
    crops = []
    for image, matrix in zip(images, matrices):
        m = np.asarray(matrix, dtype=np.float64)
        inverse = np.linalg.inv(m[:, :2])
        xy = (grid_uv - torch.from_numpy(m[:, 2])) @ torch.from_numpy(inverse).T  # size×size×2 image pixels
        h, w = image.shape[-2:]
        grid = torch.stack([2 * xy[..., 0] / max(w - 1, 1) - 1, 2 * xy[..., 1] / max(h - 1, 1) - 1], -1)
        crops.append(grid_sample(image[None], grid[None]))  # F.grid_sample; deterministic gradient on CUDA
    return torch.cat(crops)


class BuffaloArcFaceEncoder(IdentityEncoder):
    """w600k_r50 as a torch module (``cloak.models.onnx_torch``) on insightface's own crop: SCRFD's 5 keypoints
    on the clean image fix the norm_crop, which is resampled differentiably from the protected image — the
    crop the FaceID attacker embeds. ``forward`` takes [-1, 1] pixels at 112² and returns raw embeddings."""

    def __init__(self, net, detector: SCRFDDetector | None, input_mean: float = 127.5, input_std: float = 127.5,
                 name: str = RECOGNIZER_ID):
        super().__init__()
        self.net = net
        self.detector = detector
        self.input_mean, self.input_std = input_mean, input_std
        self.name = name
        self.input_size = CROP_SIZE

    def forward(self, x):
        pixels = (x.float() + 1) * 127.5
        return self.net((pixels - self.input_mean) / self.input_std)

    def face_view(self, clean, regions):
        """x → the 112² crops at the clean images' SCRFD keypoints (most confident face); where SCRFD finds
        no face, the region's box (another detector's) or the whole image, resized. ``.sources`` says which."""
        from cloak.io.images import to_uint8

        matrices, sources = [], []
        for i, image in enumerate(clean):
            faces = self.detector.detect(to_uint8(image)) if self.detector is not None else []
            if faces:
                matrices.append(alignment_matrix(faces[0].landmarks))
                sources.append("face")
            else:
                matrices.append(None)
                sources.append(regions[i].source if regions is not None and i < len(regions) else "image")

        def view(x):
            crops = []
            for i, matrix in enumerate(matrices):
                if matrix is not None:
                    crops.append(warp_crops([x[i]], [matrix]))
                else:
                    region = regions[i] if regions is not None and i < len(regions) else None
                    crops.append(crop_resize([x[i]], [region or Region(None, "image")], CROP_SIZE))
            return torch.cat(crops).clamp(-1, 1)

        view.sources = sources
        return view


def load_identity_encoder(models, role: str = "identity-encoder") -> BuffaloArcFaceEncoder:
    """The differentiable w600k_r50 with its SCRFD crop, for identity attacks (DLADiff layer 2)."""
    from cloak.models import onnx_torch

    analyzer = load_analyzer(models, role=role)
    rec_id, rec_dir, _ = models.resolve(RECOGNIZER_ID, f"{role}-embedder")
    path = model_file(rec_dir, RECOGNIZER_FILE, rec_id)
    mean, std = analyzer.recognizer.input_mean, analyzer.recognizer.input_std
    encoder = BuffaloArcFaceEncoder(onnx_torch.load(path), analyzer.detector, mean, std, name=RECOGNIZER_ID)
    encoder.requires_grad_(False)
    return encoder.to(models.device).eval()
