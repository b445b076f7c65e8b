"""Claiming an output folder for one run, and writing into folders safely.

A run that writes into OUTPUT first *claims* it (:func:`claim_output`), before any model loads:

- **lock**: an exclusive ``flock`` on ``OUTPUT/.cloak.lock``, which holds the owner's pid. A second
  run into the same folder stops at once (exit 2, naming that pid) instead of mixing its images with
  the first run's. The kernel drops the lock when the process ends, also on a crash or SIGKILL, so a
  dead run never blocks the next one; a finished run removes the file.
- **probe**: the folder is created and a probe file written and synced, so a read-only, forbidden or
  full destination is an error (exit 3, one line naming the path) before the work, not after it.
- **stale clean-up**: temporary files that killed runs left behind (``.NAME.<pid>-<token>.tmp``,
  whose pid is gone, and the older ``.NAME.XXXXXXXX.png.tmp`` from before the pid was in the name)
  are removed.

Temporary files and staging folders are named ``.NAME.<pid>-<token>.tmp`` so that a later run can tell
whether their writer is still alive, and are created with mode 0666/0777 filtered by the umask (as any
program's files are) — not 0600/0700 as :mod:`tempfile` makes them: the outputs are the user's photos.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cloak.errors import OutputError, OutputExistsError, UsageError

try:  # POSIX; elsewhere folders are not locked (the probe and the atomic writes still apply)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("cloak")

LOCK_NAME = ".cloak.lock"
_claims: weakref.WeakValueDictionary[str, OutputClaim] = weakref.WeakValueDictionary()  # by folder
_TOKEN_HEX = 8
# Ours: .NAME.<pid>-<8 hex>.tmp (files and staging folders).
_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)-[0-9a-f]{%d}\.tmp$" % _TOKEN_HEX)
# Written by earlier versions through tempfile (no pid in the name): .NAME.XXXXXXXX.tmp / .NAME.XXXXXXXX.png.tmp.
_LEGACY_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}(\.png)?\.tmp$")


def write_error(path: Path | str, exc: OSError) -> OutputError:
    """One line naming the path and the reason (disk full, read-only file system, permission denied)."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    return OutputError(f"cannot write {path}: {reason}" + (f" ({code})" if code else ""))


def temp_name(target: Path) -> Path:
    """A temporary sibling of ``target`` whose name carries this process's pid."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(_TOKEN_HEX // 2)}.tmp")


def write_atomic(target: Path, write: Callable[[object], None]) -> Path:
    """Write ``target`` through a temporary sibling renamed into place.

    ``write(fh)`` fills a binary file object. The file gets the umask's permissions; on any error the
    temporary file is removed, and an OS error becomes :class:`OutputError` naming ``target``.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(target.parent, exc) from None
    tmp = temp_name(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise write_error(target, exc) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return target


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def staging_dir(parent: Path, name: str) -> Path:
    """A new empty folder ``parent/.NAME.<pid>-<token>.tmp`` (umask permissions), to be renamed into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f".{name}.{os.getpid()}-{secrets.token_hex(_TOKEN_HEX // 2)}.tmp"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


@contextmanager
def new_model_dir(target: Path) -> Iterator[Path]:
    """Write a model directory atomically: the caller fills the yielded staging folder beside ``target``;
    on success it gets the user's umask and is renamed to ``target`` (absent or empty), on any error it is
    removed (a killed process leaves it to the stale clean-up: its pid is in the name)."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise OutputExistsError(f"model directory {target} exists and is not empty", hint="pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target.parent, target.name)
    try:
        yield staging
        apply_umask(staging)  # safetensors and the staging folder are 0600/0700; the user's umask decides
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_dir(staging: Path, target: Path, complete: Callable[[Path], bool]) -> bool:
    """Rename a finished ``staging`` folder to ``target``; True if it was ours.

    If another process published a complete ``target`` first, its folder is kept (it may be in use) and
    ours is removed: the loser of a race uses the winner's result instead of failing or deleting it.
    """
    try:
        os.rename(staging, target)
        return True
    except OSError:
        if not complete(target):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask() can only swap)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(tree: Path) -> None:
    """Give every file 0666 and every folder 0777 minus the umask under ``tree`` (libraries that write
    model weights, such as safetensors, create their files 0600)."""
    mask = current_umask()
    os.chmod(tree, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:  # pragma: no cover
        return False
    return True


def is_stale(entry: Path, started: float, *, legacy: bool = True) -> bool:
    """A temporary file/folder of a writer that is gone: its pid is dead, or (names without a pid) it
    was last touched before ``started``."""
    match = _TEMP.match(entry.name)
    if match:
        pid = int(match["pid"])
        return pid != os.getpid() and not pid_alive(pid)
    if legacy and _LEGACY_TEMP.match(entry.name):
        try:
            return entry.lstat().st_mtime < started
        except OSError:
            return False
    return False


def remove_stale(entries: Iterator[Path], started: float) -> list[Path]:
    removed = []
    for entry in entries:
        if not is_stale(entry, started):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.debug("could not remove leftover %s: %s", entry, exc)
            continue
        removed.append(entry)
    if removed:
        log.info("removed %d leftover temporary file(s) of killed runs (e.g. %s)", len(removed), removed[0])
    return removed


def _temp_entries(folder: Path) -> Iterator[Path]:
    """Every temporary-looking entry under ``folder`` (hidden folders included: .steps, .checkpoint)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + dirnames:
            if name.endswith(".tmp"):
                yield Path(dirpath) / name
        dirnames[:] = [d for d in dirnames if not d.endswith(".tmp")]


class OutputClaim:
    """An output folder held by this run: locked, known writable. :meth:`release` when done."""

    def __init__(self, path: Path, fd: int | None, created: bool):
        self.path = path
        self.fd = fd
        self.created = created  # the claim made the folder: an empty one is removed again on release
        self.thread = threading.get_ident()

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            # Unlink before unlocking: a waiting claimant then finds the file gone and starts over on a new one.
            _unlink_quietly(self.path / LOCK_NAME)
        finally:
            os.close(fd)
        if self.created:
            _rmdir_quietly(self.path)  # only when empty: the run wrote nothing

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a run abandoned by an exception still lets go once it is collected
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _holder(lock_path: Path) -> str:
    for _ in range(20):  # the holder writes its pid right after locking; give it a moment
        try:
            text = lock_path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            text = ""
        if text:
            return f"pid {text.split()[0]}"
        time.sleep(0.01)
    return "pid unknown"


def claim_output(out_dir: Path | str, *, started: float | None = None) -> OutputClaim:
    """Create, lock, probe and tidy ``out_dir`` for one run (see the module docstring).

    Raises :class:`UsageError` (exit 2) when another run holds the folder or the path is a file, and
    :class:`OutputError` (exit 3) when it cannot be created or written.
    """
    out_dir = Path(out_dir)
    started = time.time() if started is None else started
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_symlink() and not out_dir.exists():  # mkdir would fail with a bare "File exists"
        raise UsageError(f"output {out_dir} is a broken symbolic link (to {os.readlink(out_dir)})",
                         hint="create the folder it points to, or give another output folder")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out_dir, exc) from None
    key = os.path.realpath(out_dir)
    earlier = _claims.get(key)
    if earlier is not None and earlier.thread == threading.get_ident():
        # Runs do not nest, so a claim this thread still holds belongs to a run that ended in an exception
        # (the Python API; its run object kept alive by a traceback): it is over, let it go.
        earlier.release()
    try:
        fd = _lock(out_dir) if fcntl is not None else None
    except BaseException:
        if created:
            _rmdir_quietly(out_dir)
        raise
    claim = OutputClaim(out_dir, fd, created)
    _claims[key] = claim
    try:
        _probe(out_dir)
        remove_stale(_temp_entries(out_dir), started)
    except BaseException:
        claim.release()
        raise
    return claim


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _lock(out_dir: Path) -> int:
    lock_path = out_dir / LOCK_NAME
    for _ in range(50):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the folder was removed by a run that just finished with it empty
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise write_error(out_dir, exc) from None
            continue
        except OSError as exc:
            raise write_error(lock_path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise write_error(lock_path, exc) from None
            raise UsageError(f"output {out_dir} is in use by another cloak run ({_holder(lock_path)})",
                             hint="wait for that run to finish, or write to another folder") from None
        try:  # the file we locked must still be the one at the path (a finishing run unlinks it)
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(lock_path)
            raise write_error(lock_path, exc) from None
        return fd
    raise OutputError(f"could not lock {lock_path}: it keeps being replaced")  # pragma: no cover


def _probe(out_dir: Path) -> None:
    probe = out_dir / f".cloak-probe.{os.getpid()}-{secrets.token_hex(_TOKEN_HEX // 2)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _unlink_quietly(probe)
        raise write_error(out_dir, exc) from None
    _unlink_quietly(probe)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """A blocking exclusive lock on ``path`` (created if needed) for one critical section across processes."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
