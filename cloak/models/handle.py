"""``Models``: the one place that loads weights.

It resolves an id (catalog, ``[models]`` override, built-in) or a local diffusers directory, loads
each component once per (path, device, dtype) and hands the same object to every method in the
process. With ``tiny=True`` every catalog id is replaced by its built-in random stand-in of the same
architecture; the loading code is the same. Methods that train must work on their own copy
(``SDModel.trainable_copy``): the loaded objects are shared.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloak.errors import ModelUnavailableError, UsageError
from cloak.io.report import ModelRecord
from cloak.models import cache as model_cache
from cloak.models.catalog import get_spec

log = logging.getLogger("cloak.models")


def quiet_libraries() -> None:
    """diffusers/transformers draw their own bars on stdout/stderr; cloak shows one bar per verb."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@dataclass
class SDModel:
    """The components of a Stable Diffusion model, with the scheduler loaded as DDPM for training."""

    id: str
    path: Path
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler from the model's scheduler config (training/PGD math)
    stand_in: bool
    device: torch.device
    dtype: torch.dtype
    _prompt_cache: dict = field(default_factory=dict, repr=False)
    digest: str | None = None  # content digest of the model directory (content_digest); caches key on it

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The model's native image size (512 for SD 1.x/2.1-base, 64 for tiny-sd)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def trainable_copy(self) -> tuple[Any, Any]:
        """Fresh copies of UNet and text encoder for a method that fine-tunes (made once per run)."""
        unet = copy.deepcopy(self.unet)
        text_encoder = copy.deepcopy(self.text_encoder)
        for module in (unet, text_encoder):
            module.requires_grad_(True)
            module.train()
        return unet, text_encoder


DIGEST_FILE = "cloak_digest.json"
_DIGEST_FORMAT = 1


def _component_files(path: Path) -> list[Path]:
    """The files that make a diffusers model: model_index.json and every file of its component folders.

    Top-level notes (cloak_model.json, report.json, this digest) and hidden files are not the model.
    """
    files = [path / "model_index.json"] if (path / "model_index.json").is_file() else []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files += sorted(f for f in sub.rglob("*") if f.is_file() and
                        not any(part.startswith(".") for part in f.relative_to(path).parts))
    return files


def content_digest(path: Path) -> str:
    """sha256 of a model directory's content (weights and configs), whatever its path.

    Hashing gigabytes takes seconds, so each file's sha256 is stored with its size and mtime in
    ``<dir>/cloak_digest.json`` and only files whose size or mtime changed are hashed again (a folder
    replaced by ``immunize --force`` gets new mtimes, hence a new digest). A read-only folder is
    hashed each time. The digest is the sha256 of the sorted (relative path, file sha256) list.
    """
    import hashlib
    import os
    import tempfile

    path = Path(path)
    stored_path = path / DIGEST_FILE
    try:
        stored = json.loads(stored_path.read_text(encoding="utf-8"))
        known = stored.get("files", {}) if stored.get("format") == _DIGEST_FORMAT else {}
    except (OSError, ValueError, AttributeError):
        known = {}
    files: dict[str, dict[str, Any]] = {}
    for f in _component_files(path):
        st = f.stat()
        rel = f.relative_to(path).as_posix()
        entry = known.get(rel)
        if not (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
                and isinstance(entry.get("sha256"), str)):
            h = hashlib.sha256()
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    h.update(block)
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
        files[rel] = entry
    digest = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode()).hexdigest()
    if files != known:
        record = {"format": _DIGEST_FORMAT, "sha256": digest, "files": files}
        try:  # atomic: a concurrent writer computes the same content
            fd, tmp = tempfile.mkstemp(prefix=f".{DIGEST_FILE}.", dir=path)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=1)
            os.replace(tmp, stored_path)
        except OSError as exc:
            log.debug("cannot store %s (%s); the digest is recomputed next time", stored_path, exc)
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass
    return digest


# Set by warm_models(): one memo that every Models object shares (a whole `cloak eval` plan in one process).
_warm_memo: dict[tuple, Any] | None = None


@contextmanager
def warm_models():
    """Within this block every :class:`Models` shares one memo, so the verbs called one after another load
    each model once (``cloak eval``: one SD load for the whole plan, not one per verb call). Memo keys hold
    the path, device and dtype, so models of different runs never mix; the loaded objects are shared, as
    they already are between the methods of one run (methods that train copy them)."""
    global _warm_memo
    outer = _warm_memo
    if outer is None:
        _warm_memo = {}
    try:
        yield _warm_memo
    finally:
        _warm_memo = outer


def looks_like_local_model(value: str) -> bool:
    path = Path(value).expanduser()
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


class Models:
    def __init__(
        self,
        *,
        cache_dir: Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tiny: bool = False,
        overrides: dict[str, str] | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.memory = "default"  # --memory: "low" turns on gradient checkpointing in every SD loaded
        self.memory_record: dict[str, Any] = {}
        self.tiny = tiny
        self.overrides = overrides or {}
        self._memo: dict[tuple, Any] = _warm_memo if _warm_memo is not None else {}
        self._records: dict[tuple[str, str], ModelRecord] = {}
        self._digests: dict[Path, str] = {}

    def digest(self, path: Path) -> str:
        """The content digest of a model directory (see :func:`content_digest`), once per run."""
        path = Path(path)
        if path not in self._digests:
            self._digests[path] = content_digest(path)
        return self._digests[path]

    # --- resolution -----------------------------------------------------------------------------
    def resolve(self, id_or_path: str, role: str) -> tuple[str, Path, bool]:
        """(id, directory, stand_in) for a catalog id or a local directory."""
        if looks_like_local_model(id_or_path) and get_spec(id_or_path) is None:
            path = Path(id_or_path).expanduser().resolve()
            builtin = path / "cloak_builtin.json"
            stand_in = builtin.is_file() or (path / "cloak_model.json").is_file() and _stand_in_flag(path)
            # A local folder can be replaced in place: the report names its content, not only its path.
            self._record(role, str(path), path, self.digest(path), stand_in)
            return str(path), path, stand_in
        if Path(id_or_path).expanduser().exists() and get_spec(id_or_path) is None:
            raise ModelUnavailableError(f"{id_or_path} is not a diffusers model directory (no model_index.json or unet/)")
        if get_spec(id_or_path) is None and ("/" in id_or_path or id_or_path.startswith((".", "~"))):
            # A path, not an id: say so rather than "unknown model id".
            raise UsageError(f"model directory {id_or_path} does not exist",
                             hint="--model takes a catalog id (`cloak models list`) or a local diffusers directory")
        model_id = id_or_path
        spec = model_cache.spec_or_error(model_id)
        if self.tiny and not spec.builtin:
            if not spec.stand_in:
                raise ModelUnavailableError(f"model {model_id} has no built-in stand-in for --tiny")
            model_id = spec.stand_in
            spec = model_cache.spec_or_error(model_id)
        path = model_cache.resolve_path(self.cache_dir, model_id, self.overrides)
        stand_in = spec.builtin and model_id not in self.overrides
        digest = None if spec.builtin else model_cache.weights_digest(self.cache_dir, model_id)
        self._record(role, model_id, path, digest, stand_in)
        return model_id, path, stand_in

    def _record(self, role: str, model_id: str, path: Path, digest: str | None, stand_in: bool) -> None:
        spec = get_spec(model_id)
        revision = None
        if spec and not spec.builtin:  # the commit the pull resolved to, when the lock knows it
            revision = model_cache.pulled_revision(self.cache_dir, model_id) or spec.revision
        self._records[(role, model_id)] = ModelRecord(
            role=role, id=model_id, path=str(path), revision=revision, sha256=digest, stand_in=stand_in)

    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    @property
    def any_stand_in(self) -> bool:
        return any(r.stand_in for r in self._records.values())

    def packaged(self, model_id: str, role: str) -> Path:
        """Directory of weights shipped in an installed package (catalog ``source="pip:..."``).

        Real weights that install offline; never replaced by a stand-in (also with ``--tiny``).
        """
        from cloak.models.packaged import package_dir

        path = Path(self.overrides[model_id]).expanduser() if model_id in self.overrides else package_dir(model_id)
        self._record(role, model_id, path, None, False)
        return path

    def memo(self, key: tuple, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # --- loaders --------------------------------------------------------------------------------
    def sd(self, id_or_path: str, role: str = "surrogate") -> SDModel:
        model_id, path, stand_in = self.resolve(id_or_path, role)
        return self.memo(("sd", str(path), str(self.device), str(self.dtype)),
                         lambda: self._load_sd(model_id, path, stand_in))

    def _load_sd(self, model_id: str, path: Path, stand_in: bool) -> SDModel:
        from cloak._lazy_imports import library_imports

        # Collector paused for the libraries' ~470k objects, which are then frozen; the weights load after
        # the block, so the model stays collectable.
        with library_imports("models"):
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTokenizer

            quiet_libraries()
        log.info("loading %s from %s", model_id, path)
        kw = dict(local_files_only=True)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
            noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise ModelUnavailableError(f"cannot load model {model_id} from {path}: {exc}") from None
        for module in (text_encoder, vae, unet):
            module.requires_grad_(False)
            module.eval()
            module.to(self.device, dtype=self.dtype)
        if self.memory == "low":
            from cloak.diffusion.memory import apply_low_memory

            self.memory_record[model_id] = apply_low_memory(unet, vae)
        return SDModel(model_id, path, vae, unet, text_encoder, tokenizer, noise_scheduler, stand_in,
                       self.device, self.dtype, digest=self.digest(path))

    def faces(self, role: str = "faces"):
        from cloak.models import faces

        _, det_path, _ = self.resolve("retinaface-r50", f"{role}-detector")
        _, emb_path, _ = self.resolve("arcface-irse50", f"{role}-embedder")
        return self.memo(("faces", str(det_path), str(emb_path), str(self.device)),
                         lambda: faces.FaceAnalyzer(faces.load_retinaface(det_path, str(self.device)),
                                                    faces.load_arcface(emb_path, str(self.device)),
                                                    str(self.device)))


def _stand_in_flag(path: Path) -> bool:
    try:
        return bool(json.loads((path / "cloak_model.json").read_text()).get("stand_in", False))
    except (OSError, json.JSONDecodeError):
        return False
