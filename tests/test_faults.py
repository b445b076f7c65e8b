"""Faults and files: output folder claims (lock, probe, stale clean-up), write errors, permissions, the
built-in model build race (issue 14 items 10, 15, 17, 18)."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images

from cloak.errors import OutputError, UsageError
from cloak.io import output
from cloak.io.images import write_bytes_atomic, write_png
from cloak.io.output import LOCK_NAME, claim_output

WT = Path(__file__).resolve().parent.parent
DEAD_PID = 2**31 - 7  # above any pid_max: never a live process


def _cloak(*args, **popen):
    env = dict(os.environ, PYTHONPATH=str(WT), HF_HUB_OFFLINE="1", NO_COLOR="1")
    return subprocess.Popen([sys.executable, "-m", "cloak", *map(str, args)], cwd=WT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --- item 15: one run per output folder ---------------------------------------------------------------

def test_claim_locks_folder_until_released(tmp_path):
    out = tmp_path / "out"
    first = claim_output(out)
    assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    errors = []

    def second_claim():  # another thread: a concurrent run, even within this process
        try:
            claim_output(out)
        except UsageError as exc:
            errors.append(exc)

    thread = threading.Thread(target=second_claim)
    thread.start()
    thread.join()
    assert len(errors) == 1 and errors[0].exit_code == 2
    assert f"output {out} is in use by another cloak run (pid {os.getpid()})" in str(errors[0])
    first.release()
    assert not out.exists()  # the claim made it and the run wrote nothing: nothing is left behind
    with claim_output(out) as second:
        (out / "a.png").write_bytes(b"x")
        assert second.held
    assert not (out / LOCK_NAME).exists() and (out / "a.png").is_file()


def test_claim_of_a_crashed_process_is_free(tmp_path):
    out = tmp_path / "out"
    code = f"from cloak.io.output import claim_output; import os; held = claim_output({str(out)!r}); os._exit(9)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=WT, env=dict(os.environ, PYTHONPATH=str(WT)))
    assert proc.returncode == 9 and (out / LOCK_NAME).is_file()  # killed without clean-up: the file stays
    claim_output(out).release()  # ... but the lock died with the process


def test_second_run_into_same_output_exits_2_naming_the_pid(tmp_path):
    """Two real `cloak purify` processes: the first holds OUTPUT (it waits for its input list on stdin,
    after claiming the folder), the second is refused with exit 2 naming the first's pid."""
    images = write_images(tmp_path / "in", n=2)
    out = tmp_path / "out"
    first = _cloak("purify", "--method", "jpeg", "-", out, stdin=subprocess.PIPE)
    try:
        deadline = time.time() + 300  # a cold start on a loaded machine
        while not (out / LOCK_NAME).is_file() or not (out / LOCK_NAME).read_text().strip():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first run never claimed its output"
            time.sleep(0.05)
        second = _cloak("purify", "--method", "jpeg", "--seed", "1", "--force", images, out)
        _, err2 = second.communicate(timeout=300)
        assert second.returncode == 2, err2
        assert f"pid {first.pid}" in err2 and str(out) in err2
        stdout1, err1 = first.communicate("\n".join(str(p) for p in sorted(images.glob("*.png"))) + "\n", timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err1
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png", "report.json"]


# --- item 17: unwritable or full outputs, found before the work ---------------------------------------

def _enospc_after_some_bytes(monkeypatch):
    from PIL import Image

    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if isinstance(fp, io.BytesIO):  # in memory (the jpeg purifier): no disk involved
            return real_save(self, fp, *args, **kwargs)
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", save)
    return real_save


def test_enospc_in_write_png_leaves_no_temp_file(tmp_path, monkeypatch):
    _enospc_after_some_bytes(monkeypatch)
    target = tmp_path / "o" / "a.png"
    with pytest.raises(OutputError) as info:
        write_png(target, np.zeros((4, 4, 3), np.uint8))
    assert info.value.exit_code == 3
    assert str(info.value) == f"cannot write {target}: No space left on device (ENOSPC)"
    assert list((tmp_path / "o").iterdir()) == []


def test_enospc_during_a_run_is_one_line_exit_3(cli, image_dir, tmp_path, monkeypatch):
    _enospc_after_some_bytes(monkeypatch)
    out = tmp_path / "out"
    r = cli("purify", "-q", "--method", "jpeg", image_dir, out)
    assert r.exit_code == 3, r.stderr
    assert r.stderr.strip() == f"error: cannot write {out / 'img0.png'}: No space left on device (ENOSPC)"
    assert _temps(tmp_path) == [] and not list(out.glob("*.png"))


def test_unwritable_output_found_before_any_model_loads(cli, image_dir, tmp_path, monkeypatch):
    import cloak.models.handle

    class NoModels:
        def __init__(self, *a, **k):
            raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(cloak.models.handle, "Models", NoModels)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = cli("protect", "--method", "advdm", "--tiny", image_dir, blocker / "out")  # root ignores chmod; this not
    assert r.exit_code == 3, r.stderr
    assert r.stderr.strip() == f"error: cannot write {blocker / 'out'}: Not a directory (ENOTDIR)"

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(output.os, "open", read_only)
    out = tmp_path / "ro"
    out.mkdir()
    r = cli("protect", "--method", "advdm", "--tiny", image_dir, out)
    assert r.exit_code == 3, r.stderr
    assert f"cannot write {out}" in r.stderr and "Read-only file system (EROFS)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_probe_finds_a_full_disk(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output.os, "write", full)
    with pytest.raises(OutputError, match="No space left on device"):
        claim_output(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- item 10: permissions follow the umask ------------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_respect_the_umask(tmp_path, umask_022):
    png = write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_bytes_atomic(tmp_path / "report.json", b"{}")
    staged = output.staging_dir(tmp_path, "m")
    assert (_mode(png), _mode(tmp_path / "report.json"), _mode(staged)) == (0o644, 0o644, 0o755)
    os.umask(0o027)
    assert _mode(write_png(tmp_path / "b.png", np.zeros((4, 4, 3), np.uint8))) == 0o640


def test_run_outputs_and_built_model_respect_the_umask(cli, image_dir, tmp_path, umask_022):
    out = tmp_path / "out"
    assert cli("purify", "--method", "jpeg", image_dir, out).exit_code == 0
    assert {_mode(p) for p in out.iterdir()} == {0o644}

    from cloak.models import cache

    built = cache.ensure_builtin(tmp_path / "cache", "tiny-sd")
    assert _mode(built) == 0o755
    assert {_mode(p) for p in built.rglob("*") if p.is_file()} == {0o644}
    assert {_mode(p) for p in built.rglob("*") if p.is_dir()} == {0o755}


# --- item 18: leftovers of killed runs; the build race -----------------------------------------------

def test_claim_removes_temp_files_of_dead_runs_only(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    dead = out / f".img0.png.{DEAD_PID}-0123abcd.tmp"
    dead_nested = out / "sub" / f".x.png.{DEAD_PID}-89abcdef.tmp"
    legacy = out / ".img1.k2j_9xq0.png.tmp"  # tempfile's name, from before the pid was in it
    live = out / f".img2.png.{os.getppid()}-00ff00ff.tmp"
    keep = out / "img3.png"
    for p in (dead, dead_nested, legacy, live, keep):
        p.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(legacy, (old, old))
    claim_output(out).release()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        sorted([live.name, keep.name])


def _slow_builder(calls):
    def build(target: Path):
        calls.append(threading.get_ident())
        target.mkdir(parents=True)
        (target / "weights.bin").write_bytes(b"w" * 1000)
        time.sleep(1.0)  # the window in which a second builder used to race this one
    return build


def test_concurrent_builtin_builds_share_one_result(tmp_path, monkeypatch):
    from cloak.models import cache

    calls: list[int] = []
    monkeypatch.setattr(cache, "_builder", lambda model_id: _slow_builder(calls))
    results, errors = [], []

    def worker():
        try:
            results.append(cache.ensure_builtin(tmp_path, "tiny-sd"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 3
    assert len(calls) == 1  # the others waited for the first build and used it
    target = cache.model_dir(tmp_path, "tiny-sd")
    assert cache.is_complete(target) and (target / "weights.bin").read_bytes() == b"w" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == [".tiny-sd.lock", "tiny-sd"]


def test_builtin_build_removes_staging_of_killed_builds(tmp_path, monkeypatch):
    from cloak.models import cache

    models = tmp_path / "models"
    dead = models / f".tiny-sd.{DEAD_PID}-0123abcd.tmp" / "m"
    legacy = models / ".tiny-sd.ab_cd123"
    live = models / f".tiny-sd.{os.getppid()}-0123abcd.tmp"
    other = models / f".tiny-sd-v.{DEAD_PID}-0123abcd.tmp"  # another id's: its own builder tidies it
    for p in (dead, legacy, live, other):
        p.mkdir(parents=True)
    old = time.time() - 3600
    os.utime(legacy, (old, old))
    monkeypatch.setattr(cache, "_builder", lambda model_id: _slow_builder([]))
    cache.ensure_builtin(tmp_path, "tiny-sd")
    assert sorted(p.name for p in models.iterdir()) == sorted([".tiny-sd.lock", "tiny-sd", live.name, other.name])


def test_builtin_of_an_older_build_version_is_rebuilt(tmp_path, monkeypatch, caplog):
    """A cache built by an older builder (mid-sd before its heads were fixed) is rebuilt, not reused; a
    process that still has the old folder open keeps reading its files."""
    from cloak.models import cache

    calls: list[int] = []
    monkeypatch.setattr(cache, "_builder", lambda model_id: _slow_builder(calls))
    target = cache.ensure_builtin(tmp_path, "tiny-sd")
    reader = open(target / "weights.bin", "rb")  # noqa: SIM115 - held across the rebuild on purpose
    assert cache.ensure_builtin(tmp_path, "tiny-sd") == target and len(calls) == 1  # current: reused
    monkeypatch.setitem(cache.BUILD_VERSIONS, "tiny-sd", 2)
    with caplog.at_level("WARNING", logger="cloak.models"):
        assert cache.ensure_builtin(tmp_path, "tiny-sd") == target
    assert len(calls) == 2 and "older version" in caplog.text
    assert (target / cache.COMPLETE).read_text() == "built-in v2\n"
    assert reader.read() == b"w" * 1000
    reader.close()
    assert sorted(p.name for p in target.parent.iterdir()) == [".tiny-sd.lock", "tiny-sd"]
    assert cache.ensure_builtin(tmp_path, "tiny-sd") == target and len(calls) == 2


def test_benchmark_models_have_sd_wide_attention_heads():
    """mid-sd and sd21-shaped have SD 2.1's 64 channels per attention head (mid-sd once had 32 heads of
    2 channels, and CPU attention at that width dominated every benchmark on it)."""
    from diffusers.models.attention_processor import Attention

    from cloak.models.adapters import _unet_for_shape

    for name in ("mid-sd", "sd21-shaped"):
        widths = {m.inner_dim // m.heads for m in _unet_for_shape(name).modules() if isinstance(m, Attention)}
        assert widths == {64}, (name, widths)


def test_publish_dir_uses_a_complete_winner(tmp_path):
    winner = tmp_path / "target"
    winner.mkdir()
    (winner / "done").write_text("first")
    staging = output.staging_dir(tmp_path, "target")
    (staging / "done").write_text("second")
    assert output.publish_dir(staging, winner, lambda t: (t / "done").is_file()) is False
    assert (winner / "done").read_text() == "first" and not staging.exists()
    loser = output.staging_dir(tmp_path, "other")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "half").write_text("")
    with pytest.raises(OSError):  # an incomplete folder in the way is not taken for a winner
        output.publish_dir(loser, tmp_path / "other", lambda t: (t / "done").is_file())


def test_api_run_after_a_failed_run_into_the_same_folder(image_dir, tmp_path, monkeypatch):
    """The Python API: a run that raised (its traceback still held, as a REPL holds the last one) does not
    keep the folder from the next run in the same thread."""
    import cloak

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _enospc_after_some_bytes(patch)
        with pytest.raises(OutputError) as failed:
            cloak.purify(image_dir, out, method="jpeg")
    report = cloak.purify(image_dir, out, method="jpeg", force=True)
    assert failed.value is not None and report.summary["ok"] == 3
    assert not (out / LOCK_NAME).exists()


def test_saved_and_immunized_model_dirs_respect_the_umask(tiny_sd, tmp_path, umask_022):
    from cloak.attack.run import save_model_dir
    from cloak.immunize.run import write_model_dir
    from cloak.io.report import Report

    saved = save_model_dir(tiny_sd, tiny_sd.unet, tiny_sd.text_encoder, tmp_path / "saved", note={})
    immunized = write_model_dir(tiny_sd, tiny_sd.unet, tmp_path / "immunized", note={}, report=Report(verb="immunize"))
    for folder in (saved, immunized):
        assert _mode(folder) == 0o755
        assert {_mode(p) for p in folder.rglob("*") if p.is_dir()} == {0o755}, folder
        assert {_mode(p) for p in folder.rglob("*") if p.is_file()} == {0o644}, folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
