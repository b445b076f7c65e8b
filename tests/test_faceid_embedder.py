"""FaceID's own embedder (cloak.models.insightface): insightface buffalo_l's pipeline written in cloak.

What each test pins down: the alignment maps landmarks onto the ArcFace template (exact for a known
similarity, equal to scikit-image's Umeyama otherwise); SCRFD decoding of a hand-made output
(anchor order, stride scaling, threshold, NMS, score order); the pixels each network is fed (letterbox
and (x − 127.5)/128 for the detector, (x − 127.5)/127.5 RGB for the recognizer, raw pixels for graphs that
normalise themselves); ℓ2-normalised embeddings; the ONNX path on random graphs with det_10g's and
w600k_r50's contract (built here with onnx.helper and torch.onnx.export); the embedding the zero-shot
attack hands the pipeline; a clear exit-4 error without onnxruntime or weights.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image

from cloak.errors import ModelUnavailableError
from cloak.models import insightface as ins

TEMPLATE = ins.ARCFACE_TEMPLATE


def _similar(points: np.ndarray, scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return scale * points @ rot.T + np.array(shift)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _session(model):
    import onnxruntime

    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --- alignment ------------------------------------------------------------------------------------------------

def test_alignment_of_a_scaled_shifted_template_is_the_hand_computed_inverse():
    # Landmarks at 2·template + (10, 20): the crop map must halve and shift back, exactly.
    m = ins.alignment_matrix(2 * TEMPLATE + np.array([10.0, 20.0]))
    np.testing.assert_allclose(m, [[0.5, 0.0, -5.0], [0.0, 0.5, -10.0]], atol=1e-12)


@pytest.mark.parametrize("scale,degrees,shift", [(1.0, 0.0, (0.0, 0.0)), (3.7, 25.0, (140.0, -32.5)),
                                                 (0.45, -70.0, (-8.0, 300.0)), (2.0, 180.0, (400.0, 400.0))])
def test_landmarks_that_are_a_similarity_of_the_template_map_back_onto_it(scale, degrees, shift):
    landmarks = _similar(TEMPLATE, scale, degrees, shift)
    m = ins.alignment_matrix(landmarks)
    np.testing.assert_allclose(_apply(m, landmarks), TEMPLATE, atol=1e-9)
    # The linear part is the inverse similarity: scale 1/s, rotation −θ.
    a = math.radians(-degrees)
    np.testing.assert_allclose(m[:, :2], np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / scale,
                               atol=1e-12)


def test_least_squares_alignment_equals_scikit_image_umeyama_also_for_mirrored_faces():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(0)
    for mirrored in (False, True):
        landmarks = _similar(TEMPLATE, 2.5, 12.0, (90.0, 40.0)) + rng.normal(0, 3.0, (5, 2))
        if mirrored:  # a left-right flip: the best fit without reflection is no longer near-exact
            landmarks[:, 0] = -landmarks[:, 0]
        reference = SimilarityTransform()
        assert reference.estimate(landmarks, TEMPLATE)
        np.testing.assert_allclose(ins.alignment_matrix(landmarks), reference.params[:2], atol=1e-9)


def test_norm_crop_puts_each_landmark_on_its_template_pixel():
    landmarks = _similar(TEMPLATE, 2.0, 20.0, (60.0, 10.0))
    rgb = np.zeros((320, 320, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(landmarks, colours):
        rgb[int(round(y)) - 4:int(round(y)) + 5, int(round(x)) - 4:int(round(x)) + 5] = colour
    crop = ins.norm_crop(rgb, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for (x, y), colour in zip(TEMPLATE, colours):
        np.testing.assert_array_equal(crop[int(round(y)), int(round(x))], colour)
    assert crop[0, 0].tolist() == [0, 0, 0]  # outside the face's 9-px dots everything stays black


# --- SCRFD decoding -------------------------------------------------------------------------------------------

def _empty_outputs(height: int, width: int) -> list[np.ndarray]:
    outs = []
    for size in (1, 4, 10):
        for stride in ins.STRIDES:
            outs.append(np.zeros(((height // stride) * (width // stride) * 2, size), dtype=np.float32))
    return outs


def test_anchor_centres_run_by_row_then_column_then_anchor():
    centres = ins.anchor_centres(2, 3, 16)
    assert centres.tolist() == [[0, 0], [0, 0], [16, 0], [16, 0], [32, 0], [32, 0],
                                [0, 16], [0, 16], [16, 16], [16, 16], [32, 16], [32, 16]]


def test_scrfd_decoding_of_a_hand_made_output():
    outs = _empty_outputs(64, 64)  # strides 8, 16, 32: 8×8, 4×4, 2×2 grid points, 2 anchors each
    s16, b16, k16 = outs[1], outs[4], outs[7]
    # Stride 16, row 1, column 2, anchor 1 → row (1·4 + 2)·2 + 1 = 13, centre (32, 16).
    s16[13] = 0.9
    b16[13] = [1.0, 1.0, 2.0, 2.0]  # left, top, right, bottom in strides
    k16[13] = np.arange(10) / 10.0
    # The same box from the other anchor with a lower score: suppressed by NMS.
    s16[12], b16[12] = 0.8, [1.0, 1.0, 2.0, 2.0]
    # Stride 8, row 7, column 0, anchor 0 → row (7·8 + 0)·2 = 112, centre (0, 56): a separate face.
    outs[0][112], outs[3][112] = 0.6, [0.5, 0.5, 0.5, 0.5]
    # Stride 32, row 0, column 1, anchor 0 → row 2, centre (32, 0): below the 0.5 threshold.
    outs[2][2], outs[5][2] = 0.49, [1.0, 1.0, 1.0, 1.0]
    boxes, scores, kps = ins.decode_scrfd(outs, (64, 64))
    np.testing.assert_allclose(scores, [0.9, 0.6])
    np.testing.assert_allclose(boxes, [[16, 0, 64, 48], [-4, 52, 4, 60]])
    expected_kps = np.array([32.0, 16.0]) + (np.arange(10) / 10.0).reshape(5, 2) * 16
    np.testing.assert_allclose(kps[0], expected_kps, rtol=1e-6)
    # A leading batch axis (some exports) decodes the same.
    boxes_b, scores_b, _ = ins.decode_scrfd([o[None] for o in outs], (64, 64))
    np.testing.assert_allclose(boxes_b, boxes) and np.testing.assert_allclose(scores_b, scores)


def test_nms_keeps_the_best_of_overlapping_boxes_with_insightface_areas():
    boxes = np.array([[0, 0, 9, 9], [0, 0, 9, 7], [20, 20, 29, 29], [0, 0, 9, 4]], dtype=np.float32)
    scores = np.array([0.9, 0.95, 0.5, 0.7], dtype=np.float32)
    # IoU with +1 areas: box1 vs box0 = 80/100 → suppressed; box3 vs box1 = 50/80 > 0.4 → suppressed.
    assert ins.nms(boxes, scores, 0.4) == [1, 2]
    assert ins.nms(boxes, scores, 0.7) == [1, 3, 2]  # 0.625 ≤ 0.7 keeps box3; 0.8 still drops box0


class _Recording:
    """An onnxruntime-like session that records its input and answers with fixed outputs."""

    def __init__(self, input_shape, outputs):
        self.input_shape, self.outputs, self.fed = input_shape, outputs, None

    def get_inputs(self):
        return [type("I", (), {"name": "input.1", "shape": self.input_shape})()]

    def get_outputs(self):
        return [type("O", (), {"name": f"o{i}", "shape": None})() for i in range(len(self.outputs))]

    def run(self, names, feed):
        self.fed = feed["input.1"]
        return self.outputs


def test_detector_letterboxes_rgb_and_maps_faces_back_to_image_pixels():
    import cv2

    rgb = np.random.default_rng(1).integers(0, 256, (64, 32, 3), dtype=np.uint8)  # tall: 640 high, 320 wide
    outs = _empty_outputs(640, 640)
    row = (10 * 80 + 20) * 2  # stride 8, row 10, column 20, anchor 0: centre (160, 80)
    outs[0][row], outs[3][row] = 0.8, [4.0, 2.0, 4.0, 2.0]
    outs[6][row] = np.tile([1.0, -1.0], 5)
    fake = _Recording([1, 3, "h", "w"], outs)
    faces = ins.SCRFDDetector(fake).detect(rgb)
    canvas = np.zeros((640, 640, 3), dtype=np.float32)
    canvas[:, :320] = cv2.resize(rgb, (320, 640))
    expected = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(fake.fed, expected, atol=1e-6)  # channel 0 is R: no BGR swap
    (face,) = faces
    # Canvas box (128, 64, 192, 96) at scale 10 → image pixels.
    np.testing.assert_allclose(face.box, [12.8, 6.4, 19.2, 9.6], rtol=1e-6)
    np.testing.assert_allclose(face.landmarks, np.tile([[16.8, 7.2]], (5, 1)), rtol=1e-6)
    assert face.score == pytest.approx(0.8)
    # A graph with a fixed input size overrides det_size, as in insightface.
    assert ins.SCRFDDetector(_Recording([1, 3, 480, 320], outs)).input_size == (320, 480)


# --- recognizer and normalisation -----------------------------------------------------------------------------

def test_normed_embeddings_are_unit_rows_in_the_raw_direction():
    raw = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-1e-3, 0.0, 0.0]], dtype=np.float32)
    out = ins.normed(raw)
    np.testing.assert_allclose(out, [[0.6, 0.8, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], atol=1e-6)


def test_recognizer_feeds_rgb_scaled_to_unit_range_and_returns_normed_embeddings():
    rng = np.random.default_rng(2)
    crops = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    sess = _session(ins.arcface_standin_graph())
    rec = ins.ArcFaceRecognizer(sess, 127.5, 127.5)
    by_hand = (np.stack(crops).astype(np.float32) - 127.5) / 127.5
    raw = sess.run(None, {"input.1": np.ascontiguousarray(by_hand.transpose(0, 3, 1, 2))})[0]
    analyzer = ins.BuffaloFaceAnalyzer(detector=None, recognizer=rec)
    emb = analyzer.embed_aligned(crops)
    assert emb.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 0.1  # the raw output is not already unit-norm


def test_graphs_that_normalise_themselves_get_raw_pixels(tmp_path):
    import onnx

    plain, own = tmp_path / "plain.onnx", tmp_path / "own.onnx"
    onnx.save(ins.arcface_standin_graph(), str(plain))
    onnx.save(ins.arcface_standin_graph(normalises_input=True), str(own))
    assert ins.input_normalisation(plain) == (127.5, 127.5)
    assert ins.input_normalisation(own) == (0.0, 1.0)
    crop = [np.random.default_rng(3).integers(0, 256, (112, 112, 3), dtype=np.uint8)]
    a = ins.ArcFaceRecognizer(ins.session(plain), *ins.input_normalisation(plain)).embed(crop)
    b = ins.ArcFaceRecognizer(ins.session(own), *ins.input_normalisation(own)).embed(crop)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # same weights: same embedding either way


class _TinySCRFD(torch.nn.Module):
    """A torch module with det_10g's output contract, batched (1×N×k) like some exports."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, 2 * 15, s, stride=s) for s in ins.STRIDES)

    def forward(self, x):
        heads = {1: [], 4: [], 10: []}
        for conv in self.convs:
            y = conv(x).permute(0, 2, 3, 1)  # 1×h×w×(2·15)
            parts = y.reshape(1, -1, 15)  # per anchor: score, 4 distances, 10 offsets
            heads[1].append(torch.sigmoid(parts[..., :1]))
            heads[4].append(torch.nn.functional.softplus(parts[..., 1:5]))
            heads[10].append(parts[..., 5:])
        return tuple(heads[1] + heads[4] + heads[10])


def test_detector_runs_a_torch_exported_scrfd_graph_and_matches_the_torch_module(tmp_path):
    torch.manual_seed(0)
    module = _TinySCRFD().eval()
    path = tmp_path / "det.onnx"
    names = [f"{h}{s}" for h in ("score", "bbox", "kps") for s in ins.STRIDES]
    torch.onnx.export(module, torch.zeros(1, 3, 64, 64), str(path), dynamo=False, input_names=["input.1"],
                      output_names=names, dynamic_axes={"input.1": {2: "h", 3: "w"}})
    det = ins.SCRFDDetector(ins.session(path), det_size=(96, 96), threshold=0.55)
    rgb = np.random.default_rng(4).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    faces = det.detect(rgb)
    canvas, scale = ins.letterbox(rgb, (96, 96))
    with torch.no_grad():
        outs = module(torch.from_numpy((canvas.astype(np.float32) - 127.5) / 128.0).permute(2, 0, 1)[None])
    boxes, scores, kps = ins.decode_scrfd([o.numpy() for o in outs], (96, 96), threshold=0.55)
    assert len(faces) == len(boxes) > 0
    np.testing.assert_allclose([f.box for f in faces], boxes / scale, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose([f.score for f in faces], scores, atol=1e-5)
    np.testing.assert_allclose([f.landmarks for f in faces], kps / scale, rtol=1e-4, atol=1e-3)


def test_recognizer_runs_a_torch_exported_graph_like_the_torch_module(tmp_path):
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.BatchNorm2d(4), torch.nn.PReLU(4),
                                 torch.nn.Flatten(), torch.nn.Linear(4 * 28 * 28, 512), torch.nn.BatchNorm1d(512))
    module.eval()
    path = tmp_path / "rec.onnx"
    torch.onnx.export(module, torch.zeros(2, 3, 112, 112), str(path), dynamo=False, input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "n"}, "embedding": {0: "n"}})
    rec = ins.ArcFaceRecognizer(ins.session(path), *ins.input_normalisation(path))
    crops = [np.random.default_rng(i).integers(0, 256, (112, 112, 3), dtype=np.uint8) for i in range(2)]
    with torch.no_grad():
        expected = module(torch.from_numpy((np.stack(crops).astype(np.float32) - 127.5) / 127.5).permute(0, 3, 1, 2))
    np.testing.assert_allclose(rec.embed(crops), expected.numpy(), rtol=1e-4, atol=1e-4)


# --- the buffalo_l stand-ins and the attack ----------------------------------------------------------------

def test_stand_ins_have_buffalo_l_contract_and_the_analyzer_embeds_the_most_confident_face(_session_models):
    from cloak.models.handle import Models

    models = Models(cache_dir=_session_models.cache_dir, tiny=True)
    analyzer = ins.load_analyzer(models)
    det, rec = analyzer.detector.session, analyzer.recognizer.session
    assert [i.shape for i in det.get_inputs()][0][:2] == [1, 3] and len(det.get_outputs()) == 9
    assert rec.get_inputs()[0].shape[1:] == [3, 112, 112] and rec.get_outputs()[0].shape[-1] == 512
    assert analyzer.providers == ["CPUExecutionProvider"]
    rgb = np.asarray(Image.open(write_images(_session_models.cache_dir / "faceid-imgs", n=1, seed=3) / "img0.png"))
    faces = analyzer.detect(rgb)
    assert faces and [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    expected = analyzer.embed_aligned([ins.norm_crop(rgb, faces[0].landmarks)])[0]
    np.testing.assert_array_equal(analyzer.embed_first(rgb), expected)
    assert {r.id for r in models.records()} >= {"tiny-scrfd-10g", "tiny-w600k-r50"}


def test_faceid_attack_hands_the_pipeline_the_normed_buffalo_embedding(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from cloak.api import Common, run_attack
    from cloak.models.handle import Models

    embeds: list[torch.Tensor] = []
    original = StableDiffusionPipeline.__call__

    def recording(self, *args, **kwargs):
        embeds.append(kwargs["ip_adapter_image_embeds"][0].detach().cpu())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording)
    images = write_images(tmp_path / "in", n=1, seed=3)
    rep = run_attack(images, tmp_path / "out", common=Common(method="ipadapter", tiny=True, argv=[], options={
        "num_images": 1, "sample_steps": 1, "prompts": ["a photo of a person"]}))
    (sent,) = embeds
    analyzer = ins.load_analyzer(Models(cache_dir=os.environ["CLOAK_CACHE_DIR"], tiny=True))
    expected = analyzer.embed_first(np.asarray(Image.open(images / "img0.png")))
    assert sent.shape == (2, 1, 512)  # [negative zeros; positive] for classifier-free guidance
    assert torch.count_nonzero(sent[0]) == 0
    np.testing.assert_allclose(sent[1, 0].float().numpy(), expected, atol=1e-6)
    assert rep.summary["embedder"]["name"] == "insightface-buffalo_l"
    assert rep.summary["embedder"]["substitution"] is False and "substitution" not in rep.summary
    assert {m.id for m in rep.models} >= {"tiny-scrfd-10g", "tiny-w600k-r50"}


# --- errors ---------------------------------------------------------------------------------------------------

def test_without_onnxruntime_faceid_is_an_exit_4_error_naming_the_extra(cli, image_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    with pytest.raises(ModelUnavailableError, match="onnxruntime") as err:
        ins.import_onnxruntime()
    assert "cloak[faceid]" in str(err.value)
    r = cli("attack", "--method", "ipadapter", "--tiny", "-o", "num_images=1", image_dir, tmp_path / "out")
    assert r.exit_code == 4, r.stderr
    assert "onnxruntime" in r.stderr and "cloak[faceid]" in r.stderr
    assert not list((tmp_path / "out").rglob("*.png"))  # no silent fallback to another embedder


def test_missing_weights_are_an_exit_4_error_with_the_pull_command(tmp_path):
    from cloak.models.handle import Models

    models = Models(cache_dir=tmp_path / "empty-cache")
    with pytest.raises(ModelUnavailableError, match="insightface-scrfd-10g") as err:
        ins.load_analyzer(models)
    assert err.value.exit_code == 4 and "cloak models pull insightface-scrfd-10g" in str(err.value)
    (tmp_path / "pack").mkdir()
    with pytest.raises(ModelUnavailableError, match="w600k_r50.onnx is missing") as err:
        ins.model_file(tmp_path / "pack", ins.RECOGNIZER_FILE, ins.RECOGNIZER_ID)
    assert "buffalo_l" in str(err.value)


def test_an_unzipped_buffalo_l_folder_and_the_hub_layout_both_resolve(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "det_10g.onnx").write_bytes(b"x")
    hub = tmp_path / "hub" / "models" / "buffalo_l"
    hub.mkdir(parents=True)
    (hub / "det_10g.onnx").write_bytes(b"x")
    assert ins.model_file(tmp_path / "flat", "det_10g.onnx", "x") == tmp_path / "flat" / "det_10g.onnx"
    assert ins.model_file(tmp_path / "hub", "det_10g.onnx", "x") == hub / "det_10g.onnx"


def test_cuda_device_asks_onnxruntime_for_the_cuda_provider_when_installed(tmp_path, monkeypatch):
    import onnxruntime

    asked = []

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=None):
            asked.append(providers)

    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    ins.session(tmp_path / "m.onnx", "cuda:1")
    ins.session(tmp_path / "m.onnx", "cpu")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    ins.session(tmp_path / "m.onnx", "cuda")
    assert asked == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"],
                     ["CPUExecutionProvider"], ["CPUExecutionProvider"]]


def test_models_list_marks_the_insightface_weights_non_commercial(cli):
    import json

    r = cli("models", "list", "--json")
    assert r.exit_code == 0, r.stderr
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    for model_id in ("insightface-scrfd-10g", "insightface-w600k-r50"):
        assert rows[model_id]["non_commercial"] is True
        assert "non-commercial" in rows[model_id]["licence"].lower()
    assert rows["tiny-scrfd-10g"]["non_commercial"] is False


@pytest.mark.weights
def test_real_buffalo_l_finds_and_embeds_the_astronaut(_session_models, astronaut):
    """With the real weights: one confident face on a real portrait; a mirrored copy is the same person."""
    analyzer = ins.load_analyzer(_session_models)
    faces = analyzer.detect(astronaut)
    assert faces and faces[0].score > 0.7
    x1, y1, x2, y2 = faces[0].box
    assert 150 < (x1 + x2) / 2 < 300 and 50 < (y1 + y2) / 2 < 200  # the face in the upper middle
    e = analyzer.embed_first(astronaut)
    e_flip = analyzer.embed_first(np.ascontiguousarray(astronaut[:, ::-1]))
    assert float(e @ e_flip) > 0.6


# --- the recognizer as a torch module (DLADiff layer 2) -----------------------------------------------------------

def _ops_graph():
    """A graph with the converter's remaining operators: Constant, Reshape (with 0 and −1), MatMul, Div, Relu,
    Sigmoid, Dropout, Identity, Gemm without transB, and an asymmetrically padded Conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3], pads=[0, 1, 2, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([0, -1], np.int64))),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "mw"], ["m"]),
        helper.make_node("Div", ["m", "two"], ["d"]),
        helper.make_node("Sigmoid", ["d"], ["s"]),
        helper.make_node("Dropout", ["s"], ["dr"]),
        helper.make_node("Identity", ["dr"], ["i"]),
        helper.make_node("Gemm", ["i", "gw", "gb"], ["y"], alpha=0.5, beta=2.0),
    ]
    flat = 4 * 9 * 8  # 4 channels, 18+2 rows → 9, 16+2 cols → 8
    inits = [init("cw", rng.normal(0, 0.3, (4, 3, 3, 3))), init("cb", rng.normal(0, 0.1, 4)),
             init("mw", rng.normal(0, 0.1, (flat, 16))), init("two", [2.0]),
             init("gw", rng.normal(0, 0.3, (16, 6))), init("gb", rng.normal(0, 0.1, 6))]
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 17, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model, (2, 3, 17, 16)


def _exported_iresnet(tmp_path):
    class Block(torch.nn.Module):  # arcface_torch's IBasicBlock at toy width
        def __init__(self, c):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.BatchNorm2d(c), torch.nn.Conv2d(c, c, 3, 1, 1, bias=False),
                                            torch.nn.BatchNorm2d(c), torch.nn.PReLU(c),
                                            torch.nn.Conv2d(c, c, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(c))
            self.down = torch.nn.Sequential(torch.nn.Conv2d(c, c, 1, 2, bias=False), torch.nn.BatchNorm2d(c))

        def forward(self, x):
            return self.body(x) + self.down(x)

    torch.manual_seed(6)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.PReLU(4),
                              Block(4), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Dropout(0.4),
                              torch.nn.Linear(4 * 28 * 28, 512), torch.nn.BatchNorm1d(512))
    for m in net.modules():  # non-trivial running statistics, as trained weights have
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
    net.eval()
    path = tmp_path / "iresnet.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), str(path), dynamo=False, input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "n"}, "embedding": {0: "n"}})
    import onnx

    return onnx.load(str(path)), (2, 3, 112, 112)


@pytest.mark.parametrize("which", ["standin", "standin-self-normalising", "torch-export", "ops"])
def test_onnx_graph_as_torch_matches_onnxruntime_and_has_input_gradients(which, tmp_path):
    from cloak.models.onnx_torch import OnnxGraphModule

    model, shape = {"standin": lambda: (ins.arcface_standin_graph(), (2, 3, 112, 112)),
                    "standin-self-normalising": lambda: (ins.arcface_standin_graph(normalises_input=True),
                                                         (2, 3, 112, 112)),
                    "torch-export": lambda: _exported_iresnet(tmp_path), "ops": _ops_graph}[which]()
    x = np.random.default_rng(7).uniform(-1, 1, shape).astype(np.float32)
    if which == "standin-self-normalising":
        x = (x + 1) * 127.5
    sess = _session(model)
    expected = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    module = OnnxGraphModule(model)
    inp = torch.from_numpy(x).requires_grad_(True)
    out = module(inp)
    assert out.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(out.detach().numpy() - expected).max()) <= 1e-4 * scale
    (grad,) = torch.autograd.grad(out.square().sum(), inp)
    assert float(grad.abs().sum()) > 0


def test_graph_with_an_unsupported_operator_is_refused_by_name():
    from onnx import TensorProto, helper

    from cloak.models.onnx_torch import OnnxGraphModule

    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(ModelUnavailableError, match="unsupported operators Softmax"):
        OnnxGraphModule(helper.make_model(graph))


def test_differentiable_crop_is_norm_crop():
    rng = np.random.default_rng(8)
    low = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    rgb = np.asarray(Image.fromarray(low).resize((200, 160), Image.BICUBIC))
    landmarks = _similar(TEMPLATE, 1.3, -15.0, (40.0, 5.0))
    matrix = ins.alignment_matrix(landmarks)
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).double()
    crop = ins.warp_crops([image], [matrix])[0].permute(1, 2, 0).numpy()
    # OpenCV interpolates in fixed point (1/32 pixel, 15-bit weights) and rounds to uint8.
    assert np.abs(crop - ins.norm_crop(rgb, landmarks)).max() <= 1.5


def test_dladiff_layer2_attacks_faceids_recognizer_better_than_noise(tmp_path):
    """Seen on the random stand-ins: cosine to clean 0.9982 protected vs 0.9992 for ±8/255 noise (a random
    miniature IResNet moves little; the test checks the ordering, which a dead gradient would not give)."""
    from cloak.adversarial.identity import IdentityLoss, Region
    from cloak.api import Common, run_protect
    from cloak.io.images import read_images
    from cloak.models.encoders import load_identity_encoder
    from cloak.models.handle import Models

    images = write_images(tmp_path / "in", n=2, seed=3)
    rep = run_protect(images, tmp_path / "out", common=Common(
        method="dladiff", tiny=True, argv=[], options={"layers": "zs", "zs_steps": "6",
                                                       "encoders": "insightface-w600k-r50"}))
    zs = rep.summary["layer_zs"]
    assert zs["encoders"] == ["insightface-w600k-r50"] and zs["faces_found"] == 2  # SCRFD keypoints fixed the crops
    assert {"tiny-scrfd-10g", "tiny-w600k-r50"} <= {m.id for m in rep.models}
    name = "insightface-w600k-r50"
    assert zs["mean_identity_cos"][name] < zs["mean_identity_cos_before_zs"][name]
    # The control: ±8/255 random signs, the same budget, scored on the same crops by the same network.
    clean = read_images(images, 64).pixels
    protected = read_images(tmp_path / "out", 64).pixels
    levels = torch.from_numpy(np.random.default_rng(0).choice([-8, 8], size=clean.shape)).float()
    noise = (clean + levels / 127.5).clamp(-1, 1)
    models = Models(cache_dir=os.environ["CLOAK_CACHE_DIR"], tiny=True)
    encoder = load_identity_encoder(models, "insightface-w600k-r50")
    loss = IdentityLoss([encoder], [Region(None, "image")] * 2, clean)
    with torch.no_grad():
        cos_protected, cos_noise = float(loss(protected)), float(loss(noise))
    assert cos_protected < cos_noise, (cos_protected, cos_noise)
