"""cloak in a person's hands: a real terminal (pty), Ctrl-C, clean streams, readable help, the Python API."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import pkgutil
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import run_cli, write_images

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="xterm-256color", HF_HUB_OFFLINE="1", **extra)
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


def run_in_pty(args: list[str], *, cols: int = 120, timeout: float = 300) -> tuple[int, str]:
    """Run ``cloak ARGS`` with stdin, stdout and stderr on a pseudo-terminal; return (exit code, screen)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "cloak", *map(str, args)], stdin=slave, stdout=slave,
                            stderr=slave, env=_env(), close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def _plain(screen: str) -> str:
    return ANSI.sub("", screen).replace("\r", "\n")


PTY_RUNS = {
    "protect": lambda tmp: ["protect", "--method", "photoguard", "--tiny", "--effort", "0.02", "--resolution", "64",
                            write_images(tmp / "in", n=2), tmp / "out"],
    "purify": lambda tmp: ["purify", "--method", "jpeg", write_images(tmp / "in", n=3), tmp / "out"],
    "attack": lambda tmp: ["attack", "--tiny", "--steps", "2", "-o", "class_images=0", "--num-images", "2",
                           "--sample-steps", "2", "--resolution", "64", write_images(tmp / "in", n=2), tmp / "out"],
    "score": lambda tmp: ["score", write_images(tmp / "gen", n=3), "--ref", write_images(tmp / "ref", n=3, seed=1),
                          "--metric", "psnr,linf"],
}


@pytest.mark.parametrize("verb", list(PTY_RUNS))
def test_verbs_run_in_a_real_terminal_with_a_bar_and_a_final_line(verb, tmp_path):
    code, screen = run_in_pty(PTY_RUNS[verb](tmp_path))
    text = _plain(screen)
    assert code == 0, text[-3000:]
    assert "Error" not in text and "error:" not in text, text[-3000:]
    # The bar was drawn (rich's bar glyphs, the done/total column and the ETA label) and then cleared.
    # The bar line (description, counter, ETA) is on the screen. Its drawn bar (━) may be missing for purify
    # jpeg, which finishes in ~0.1 s: only the first frame, before any refresh of the bar column, is seen.
    assert ("━" in screen or verb == "purify") and "eta" in text and re.search(r"\b\d+/\d+\b", text), text[-3000:]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if verb == "score":
        assert any(line.startswith("psnr\t") or line.startswith("psnr ") for line in lines), lines[-10:]
        assert any(line.startswith("linf") for line in lines), lines[-10:]
    else:
        assert str(tmp_path / "out" / ("gen" if verb == "attack" else "")).rstrip("/") in lines, lines[-10:]
        assert any(re.match(rf"{verb} \S+ · ok \d+ · [\d.]+s$", line) for line in lines), lines[-10:]


def test_help_on_a_terminal_keeps_bracketed_text(tmp_path):
    code, screen = run_in_pty(["protect", "--help"], cols=200)
    text = _plain(screen)
    assert code == 0
    assert "[env CLOAK_DEVICE]" in text and "[env CLOAK_CACHE_DIR]" in text and "[Q]" in text
    assert "<bool>" not in text and "<list[str]>" not in text and "<str>" not in text


# --- Ctrl-C ----------------------------------------------------------------------------------------------


def test_ctrl_c_says_what_was_kept_and_the_command_that_resumes(tmp_path):
    images = write_images(tmp_path / "in", n=120, size=(128, 128))
    out = tmp_path / "out dir"  # a space: the resume command must quote it
    args = ["purify", "--method", "gaussian", "--force", str(images), str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "cloak", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), text=True)
    deadline = time.monotonic() + 240
    while not (out.is_dir() and any(out.glob("*.png"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    kept = len(list(out.glob("*.png")))
    assert 0 < kept < 120
    lines = [line for line in stderr.splitlines() if line.strip()]
    interrupted = [line for line in lines if line.startswith("interrupted")]
    assert len(interrupted) == 1, stderr
    line = interrupted[0]
    assert f"kept {kept} finished output file(s) in {out}" in line, line
    resume = shlex.join(["cloak", *[a for a in args if a != "--force"], "--resume"])
    assert line.endswith(f"resume with: {resume}"), line
    assert "Traceback" not in stderr and stdout == ""
    # The printed command, run as printed, finishes the set.
    argv = shlex.split(line.partition("resume with: ")[2])
    assert argv[0] == "cloak"
    r = run_cli(*argv[1:])
    assert r.exit_code == 0, r.stderr
    assert len(list(out.glob("*.png"))) == 120


def test_interrupt_message_names_checkpoints_and_replaces_force(tmp_path):
    from cloak.cli import _run

    out = tmp_path / "prot"
    (out / ".cloak-state").mkdir(parents=True)
    (out / "a.png").write_bytes(b"x")
    (out / "report.json").write_text("{}")
    _run.current_output = out
    try:
        message = _run.interrupted_message(["protect", "--method", "aspl", "--force", "in", str(out)])
    finally:
        _run.current_output = None
    assert message.startswith(f"interrupted: kept 1 finished output file(s) in {out} and checkpoints in "
                              f"{out / '.cloak-state'}; resume with: cloak protect --method aspl in ")
    assert message.endswith(" --resume") and "--force" not in message


# --- stdout: one format per mode ---------------------------------------------------------------------------


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.mark.parametrize("mode", ["default", "json", "jsonl", "quiet"])
def test_purify_stdout_holds_one_format_per_mode(mode, image_dir, tmp_path):
    out = tmp_path / "out"
    flags = {"default": [], "json": ["--json"], "jsonl": ["--jsonl"], "quiet": ["-q"]}[mode]
    r = run_cli("purify", "--method", "jpeg", *flags, image_dir, out)
    assert r.exit_code == 0, r.stderr
    if mode in ("default", "quiet"):
        assert r.stdout == f"{out}\n"
    elif mode == "json":
        assert json.loads(r.stdout)["verb"] == "purify"
    else:
        records = _records(r.stdout)
        assert len(records) == 3 and all(rec["status"] == "ok" for rec in records)
    if mode == "quiet":
        assert r.stderr == ""
    else:
        assert "purify jpeg · ok 3" in r.stderr


@pytest.mark.parametrize("mode", ["default", "json", "jsonl", "quiet"])
def test_score_stdout_holds_one_format_per_mode(mode, image_dir, ref_dir):
    flags = {"default": [], "json": ["--json"], "jsonl": ["--jsonl"], "quiet": ["-q"]}[mode]
    r = run_cli("score", image_dir, "--ref", ref_dir, "--metric", "psnr,linf", *flags)
    assert r.exit_code == 0, r.stderr
    if mode in ("default", "quiet"):
        assert [line.split("\t")[0] for line in r.stdout.splitlines()] == ["psnr", "linf"]
    elif mode == "json":
        assert set(json.loads(r.stdout)["summary"]["metrics"]) == {"psnr", "linf"}
    else:  # nothing but one JSON record per line: no metric<TAB>mean lines after them
        records = _records(r.stdout)
        assert records and all(isinstance(rec, dict) for rec in records)
    assert (r.stderr == "") == (mode == "quiet")


def test_models_list_piped_is_only_tsv(capfd):
    r = run_cli("models", "list")
    assert r.exit_code == 0
    rows = r.stdout.splitlines()
    assert rows and all(len(row.split("\t")) == 6 for row in rows)  # id, status, kind, trust, licence, size
    assert "tiny-sd" in {row.split("\t")[0] for row in rows}


def test_models_list_on_a_terminal_is_one_table():
    code, screen = run_in_pty(["models", "list"], cols=200)
    text = _plain(screen)
    assert code == 0
    assert "\t" not in text  # not the TSV as well as the table
    assert re.search(r"tiny-sd\s+│\s+built-in", text), text


# --- messages ------------------------------------------------------------------------------------------------


def test_error_hints_keep_square_brackets(image_dir, tmp_path):
    r = run_cli("protect", "--method", "advdm", "--model", "sd15", image_dir, tmp_path / "out")
    assert r.exit_code == 4, r.stderr
    assert "[models].sd15" in r.stderr


def test_help_keeps_square_brackets_and_has_no_type_placeholders(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for verb in ("protect", "score", "attack"):
        r = run_cli(verb, "--help")
        assert r.exit_code == 0
        assert "[env CLOAK_DEVICE]" in r.stdout
        assert not re.search(r"<(bool|str|int|float|path|list\[str\])>", r.stdout), verb


def test_a_warning_prints_once_on_one_unwrapped_line(image_dir, tmp_path):
    r = run_cli("purify", "--method", "jpeg", image_dir, tmp_path / "out")  # no LPIPS weights in the test cache
    assert r.exit_code == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "LPIPS to the input not computed" in line]
    assert len(lines) == 1, r.stderr
    assert len(lines[0]) > 80 and lines[0].startswith("warning: ") and "--tiny for random stand-ins" in lines[0]
    assert all(line == line.rstrip() for line in r.stderr.splitlines())


def test_methods_names_the_verb_a_method_belongs_to():
    r = run_cli("methods", "purify", "aspl")
    assert r.exit_code == 2
    assert "aspl is a protect method" in r.stderr and "did you mean" not in r.stderr


# --- progress off a terminal ---------------------------------------------------------------------------------


def test_rich_bar_renders_before_its_first_status_and_keeps_brackets():
    import io

    from rich.console import Console

    from cloak._progress import RichProgress

    screen = io.StringIO()
    progress = RichProgress(Console(file=screen, force_terminal=True, width=120, no_color=True))
    try:
        with progress.task("aspl [ensemble]", 4) as task:
            progress.bar.refresh()  # the bar thread's first refresh, before any advance
            task.advance(1, status="loss [0.5]")
            progress.bar.refresh()
    finally:
        progress.stop()
    text = _plain(screen.getvalue())
    assert "aspl [ensemble]" in text and "loss [0.5]" in text and "1/4" in text and "eta" in text


def test_progress_lines_off_a_terminal_every_tenth_or_30_seconds():
    import io

    from cloak._progress import LineProgress

    now = [0.0]
    stream = io.StringIO()
    progress = LineProgress(stream, clock=lambda: now[0])
    with progress.task("attack", 100) as task:
        for _ in range(100):
            now[0] += 0.1
            task.advance(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "attack: 10/100 (10%), 1s elapsed, eta 9s" and lines[-1].startswith("attack: 100/100 (100%)")

    slow = io.StringIO()
    now[0] = 0.0
    with LineProgress(slow, clock=lambda: now[0]).task("sampling", 1000) as task:
        for _ in range(300):  # 300 s for 30 %: a line every 30 s, not only every 100 steps
            now[0] += 1.0
            task.advance(1, status="loss 0.5")
    lines = slow.getvalue().splitlines()
    done = [int(re.match(r"sampling: (\d+)/", line)[1]) for line in lines]
    assert done == [30, 60, 90, 100, 130, 160, 190, 200, 230, 260, 290]  # 30 s apart, and at each 10 %
    assert lines[0] == "sampling: 30/1000 (3%), 30s elapsed, eta 16m10s (loss 0.5)"


def test_cli_prints_progress_lines_on_a_non_terminal_stderr_without_v(image_dir, tmp_path):
    r = run_cli("purify", "--method", "jpeg", image_dir, tmp_path / "out")
    assert r.exit_code == 0
    assert re.search(r"^purify jpeg: 3/3 \(100%\), \d+s elapsed, eta 0s$", r.stderr, re.M), r.stderr


# --- the Python API ----------------------------------------------------------------------------------------


def _import_everything() -> None:
    import cloak

    for info in pkgutil.walk_packages(cloak.__path__, "cloak."):
        try:
            importlib.import_module(info.name)
        except ImportError as exc:  # an optional extra (dlib, ...) that this machine lacks
            if not (exc.name and not exc.name.startswith("cloak")):
                raise


def test_python_api_runs_each_verb_twice_after_importing_every_submodule(tmp_path):
    import cloak
    from cloak.io.report import Report

    _import_everything()
    images = write_images(tmp_path / "in", n=2)
    for i in range(2):
        r = cloak.protect(images, tmp_path / f"p{i}", method="photoguard", tiny=True, effort=0.02, resolution=64,
                          seed=i)
        assert isinstance(r, Report) and r["summary"]["ok"] == 2 and r.summary["ok"] == 2
        assert r["items"][0]["status"] == "ok" and r["schema"] == "cloak.report/1" and "summary" in r
        r = cloak.purify(images, tmp_path / f"u{i}", method="jpeg", options={"quality": 50 + i})
        assert r["options"]["quality"]["value"] == 50 + i
        r = cloak.attack(images, tmp_path / f"a{i}", tiny=True, steps=1, num_images=1, sample_steps=1,
                         resolution=64, options={"class_images": 0})
        assert r["verb"] == "attack" and r["summary"]["ok"] >= 1
        r = cloak.score(tmp_path / f"p{i}", ref=images, metrics=["psnr"])
        assert r["summary"]["metrics"]["psnr"]["n"] == 2
        r = cloak.immunize(images, tmp_path / f"m{i}", tiny=True, options={"class_images": 1, "class_image_steps": 1,
                                                                          "safe_image_steps": 1, "iterations": 1,
                                                                          "inner_steps": 1})
        assert r.verb == "immunize"
    assert callable(cloak.protect) and callable(cloak.score)
    with pytest.raises(TypeError):
        cloak.score(images, no_such_flag=1)


# --- completion -------------------------------------------------------------------------------------------


def _bash_complete(script: Path, words: list[str], cwd: Path) -> list[str]:
    """COMPREPLY of the generated bash completion for WORDS (the last one is being typed)."""
    quoted = " ".join(shlex.quote(w) for w in words)
    program = (f"source {shlex.quote(str(script))}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
               "_cloak 2>/dev/null; printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


def test_bash_completion_offers_names_not_files_where_a_name_is_expected(tmp_path):
    r = run_cli("completion", "bash")
    assert r.exit_code == 0
    script = tmp_path / "cloak.bash"
    script.write_text(r.stdout)
    for name in ("aspl-notes.txt", "tiny-file.txt", "eps-file.txt", "0.5-file"):
        (tmp_path / name).write_text("x")
    shown = _bash_complete(script, ["cloak", "methods", "show", "as"], tmp_path)
    assert "aspl" in shown and "aspl-notes.txt" not in shown
    pulled = _bash_complete(script, ["cloak", "models", "pull", "ti"], tmp_path)
    assert "tiny-sd" in pulled and "tiny-file.txt" not in pulled
    keys = _bash_complete(script, ["cloak", "protect", "-o", "ep"], tmp_path)
    assert "eps=" in keys and "eps-file.txt" not in keys
    assert _bash_complete(script, ["cloak", "protect", "--eps", ""], tmp_path) == []
    assert "aspl-notes.txt" in _bash_complete(script, ["cloak", "protect", "--ref", "as"], tmp_path)
    assert "tiny-file.txt" in _bash_complete(script, ["cloak", "protect", "--method", "aspl", "ti"], tmp_path)


def test_make_install_man_puts_pages_where_man_finds_them(tmp_path):
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    done = subprocess.run(["make", "-s", "install-man", f"PREFIX={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    installed = sorted(p.name for p in (tmp_path / "share/man/man1").glob("*.1"))
    assert "cloak.1" in installed and "cloak-protect.1" in installed
    assert installed == sorted(p.name for p in (ROOT / "man").glob("*.1"))
    if shutil.which("man"):
        found = subprocess.run(["man", "-w", "cloak-protect"], capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, MANPATH=str(tmp_path / "share/man")))
        assert found.stdout.strip() == str(tmp_path / "share/man/man1/cloak-protect.1")
