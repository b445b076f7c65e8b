"""Shared test fixtures: an isolated environment, seeded image folders, and a CLI runner.

Every test runs offline with its own config/home directories; the model cache is shared across the
session (built-in models and class images are built once) unless a test asks for a fresh one.
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("RUN_SLOW") == "1"
    has_weights = os.environ.get("CLOAK_TEST_WEIGHTS") == "1"
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set RUN_SLOW=1"))
        if "weights" in item.keywords and not has_weights:
            item.add_marker(pytest.mark.skip(reason="needs real weights: set CLOAK_TEST_WEIGHTS=1"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cloak-cache")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, shared_cache, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("CLOAK_CACHE_DIR", str(shared_cache))
    monkeypatch.setenv("NO_COLOR", "1")
    for var in ("CLOAK_DEVICE", "CLOAK_CONFIG", "CLOAK_DEBUG", "CLOAK_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


def write_images(folder: Path, n: int = 3, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    """Seeded smooth RGB images (random but image-like: low-frequency colour fields)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize(size, Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, size=(size[1], size[0], 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def pngs(folder: Path) -> dict[str, np.ndarray]:
    """The PNGs directly in ``folder`` by file name, RGB, as int16 so differences do not wrap."""
    return {p.name: np.asarray(Image.open(p).convert("RGB")).astype(np.int16) for p in sorted(folder.glob("*.png"))}


def write_sign_noise(clean: Path, out: Path, levels: int, seed: int = 0) -> Path:
    """The control every efficacy test beats: each PNG of ``clean`` plus ±``levels`` random signs (the same
    budget as the protection, at the photo's own size)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, arr in pngs(clean).items():
        noisy = np.clip(arr + rng.choice([-levels, levels], size=arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(out / name)
    return out


@pytest.fixture
def image_dir(tmp_path) -> Path:
    return write_images(tmp_path / "images")


@pytest.fixture
def ref_dir(tmp_path) -> Path:
    return write_images(tmp_path / "ref", seed=1)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """A real public-domain portrait (scikit-image's astronaut), RGB uint8 512×512."""
    from skimage import data

    return data.astronaut()


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> Result:
    """Run ``cloak ARGS`` in-process through ``cloak.cli.main`` (exit codes as a user sees them)."""
    from cloak.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


# Tiny runs: the smallest settings that still execute every branch of a method.
TINY = ["--tiny", "-o", "class_images=2"]


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """At most two intra-op threads (the CI machine has two cores); more would oversubscribe them."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for a test: with two threads on two busy cores, OpenMP barriers spin and a tiny
    DreamBooth step took ~10× longer (0.45 s vs 4.2 s CPU for the same work). ``_threads_restored`` puts the
    count back afterwards."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads_restored():
    """Every test leaves torch's intra-op thread count as it found it. A test that set one thread and kept it
    made every later test in the process run single-threaded, and the pinned-bytes tests (recorded at two
    threads: reductions split differently) failed only in the full run."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def _session_models(shared_cache):
    import torch

    from cloak.models.handle import Models

    return Models(cache_dir=shared_cache, device="cpu", dtype=torch.float32)


@pytest.fixture
def tiny_sd(_session_models):
    """The built-in tiny-sd, loaded through from_pretrained like real weights."""
    return _session_models.sd("tiny-sd")


@pytest.fixture
def tiny_sd_v(_session_models):
    return _session_models.sd("tiny-sd-v")


# --- efficacy on a tiny model that knows the image domain (shared by the efficacy tests) ------------------


def identity_set(folder: Path, n: int, seed: int, size: int = 64) -> Path:
    """Crops of one smooth colour field with per-image jitter and noise: one 'subject', many photos."""
    folder.mkdir(parents=True, exist_ok=True)
    field = np.random.default_rng(7).uniform(0, 255, size=(5, 5, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(field).resize((size + 8, size + 8), Image.BICUBIC)).astype(np.int16)
    rng = np.random.default_rng(seed)
    for i in range(n):
        dx, dy = rng.integers(0, 9, size=2)
        img = field[dy:dy + size, dx:dx + size] + rng.integers(-10, 11, size=(size, size, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="session")
def domain_base(tmp_path_factory, shared_cache) -> Path:
    """tiny-sd after a short DreamBooth on images of the test domain, as a local model directory.

    On the random tiny-sd the denoising loss does not depend on the image (test_protect_family's docstring);
    on this model it does, so objectives built on it can tell a protection from noise."""
    import torch

    root = tmp_path_factory.mktemp("domain-base")
    data = identity_set(root / "D", 4, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the per-test one-thread fixtures
    r = run_cli("attack", "--tiny", "--cache-dir", shared_cache, "-q", "--steps", "60", "-o", "lr=1e-3",
                "-o", "class_images=0", "-o", "batch_size=2", "--num-images", "0", "--save-model", root / "base",
                data, root / "pretrain")
    torch.set_num_threads(threads)
    assert r.exit_code == 0, r.stderr[-3000:]
    return root / "base"


def attacker_loss(train: Path, out: Path, model: Path) -> float:
    """Attacker's denoising loss after DreamBooth (published lr 5e-7), on its own training images."""
    import json

    r = run_cli("attack", "--model", model, "--json", "--seed", "0", "--steps", "4", "-o", "class_images=0",
                "--num-images", "0", "--ref", train, train, out)
    assert r.exit_code == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["summary"]["ref_denoising_loss"]
