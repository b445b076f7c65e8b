"""The ``cloak`` command. Imports no torch: every verb imports its machinery when it runs.

``main()`` is the only place where errors become exit codes (ARCHITECTURE §5):
0 ok · 1 runtime error · 2 usage/config · 3 bad input · 4 model unavailable · 5 partial failure ·
6 score gate failed · 130 interrupted.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

import typer

from cloak import __version__

app = typer.Typer(
    name="cloak",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
    help="Protect photos against unauthorized personalization of text-to-image diffusion models, and measure "
         "such protections honestly.\n\n"
         "Verbs compose through plain image directories: protect → purify → attack → score.",
    epilog="Examples:\n\n"
           "  cloak protect --method aspl photos/ protected/\n\n"
           "  cloak attack --method dreambooth protected/ attacked/\n\n"
           "  cloak score attacked/gen --ref photos/ --metric ism --metric fdfr --fail-if 'ism>0.35'\n\n"
           "  cloak models pull sd21-base          (once, on a machine with network access)\n\n"
           "  make demo                            (everything on the built-in tiny-sd model)",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cloak {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """cloak: anti-personalization protections and their honest measurement."""


def _register() -> None:
    from cloak.cli import attack, completion, config_cmd, eval, immunize, methods, models, protect, purify, score

    for module in (protect, immunize, purify, attack, score, eval, methods):
        module.register(app)
    app.add_typer(models.app, name="models")
    app.add_typer(config_cmd.app, name="config")
    completion.register(app)


_register()


# Rich styles that help texts use on purpose; every other "[" in a help text is literal text.
_STYLE_TAG = re.compile(r"\[(?!/?(?:bold|italic|dim|red|green|yellow)\b[^\]]*\])")


def _escape_help(text: str | None) -> str | None:
    return _STYLE_TAG.sub(r"\\[", text) if text else text


def _reflow(text: str | None) -> str | None:
    """Join the source's line breaks inside a prose paragraph (the terminal wraps it); keep blocks laid
    out in columns (examples, tables: click has already removed their indentation) as they are."""
    if not text:
        return text
    paragraphs = text.strip("\n").split("\n\n")
    return "\n\n".join(p if any(line[:1].isspace() or "  " in line.strip() for line in p.splitlines()) else " ".join(p.splitlines())
                       for p in paragraphs)


def _readable_types(param) -> None:
    """Typer shows a type placeholder for every parameter (``<bool>`` for a flag, ``<list[str]>``):
    flags get none, arguments their name only, options their metavar or a word for the value."""
    if param.param_type_name == "argument" or getattr(param, "is_flag", False) or getattr(param, "count", False):
        param.display_type_rich = lambda ctx: None
        return
    if param.metavar:
        return
    try:
        kind = param.bare_type().removeprefix("list[").removesuffix("]")
    except (AttributeError, AssertionError):
        kind = ""
    word = {"int": "N", "float": "NUMBER", "Path": "PATH", "bool": "BOOL"}.get(kind) or \
        (param.name or "value").upper().replace("_", "-")
    param.display_type_rich = lambda ctx, word=word: word


def _polish(command) -> None:
    command.help = _escape_help(_reflow(command.help))
    command.epilog = _escape_help(command.epilog)
    help_option = command.get_help_option

    def get_help_option(ctx, help_option=help_option):
        option = help_option(ctx)
        if option is not None:
            _readable_types(option)
        return option

    command.get_help_option = get_help_option
    for param in command.params:
        if hasattr(param, "help"):
            param.help = _escape_help(param.help)
        _readable_types(param)
    for sub in getattr(command, "commands", {}).values():
        _polish(sub)


def command():
    """The click command behind ``cloak``, with help texts escaped for Rich and readable value words."""
    import typer.main

    cmd = typer.main.get_command(app)
    _polish(cmd)
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and map errors to exit codes."""
    from cloak.cli import _output
    from cloak.errors import CloakError

    args = sys.argv[1:] if argv is None else argv
    _output.reset()
    try:
        rv = command().main(args=args, prog_name="cloak", standalone_mode=False)
        if rv == 130:  # typer turned Ctrl-C into a bare Exit(130) and returned its code
            return _interrupted(args)
        return rv if isinstance(rv, int) else 0
    except CloakError as exc:
        _output.error(str(exc))
        if os.environ.get("CLOAK_DEBUG"):
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted(args)
    except typer.Exit as exc:
        # typer turns Ctrl-C into a bare Exit(130) before this handler could see the KeyboardInterrupt.
        if exc.exit_code == 130 and isinstance(exc.__cause__, KeyboardInterrupt):
            return _interrupted(args)
        return exc.exit_code
    except typer.Abort:
        return _interrupted(args)
    except typer.TyperException as exc:  # usage errors from the (vendored) click parser
        if hasattr(exc, "show"):
            exc.show(file=sys.stderr)
        else:
            _output.error(exc.format_message())
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 — last resort: one line, traceback with CLOAK_DEBUG
        if _out_of_memory(exc):
            _output.error(f"out of memory: {str(exc).splitlines()[0]}")
            _output.note("hint: aspl, fsmg, simac and cap take -o pgd_batch=N (N images per UNet pass, "
                         "the same step up to rounding); "
                         "metacloak and dladiff put the whole set in one batch: protect fewer images per run; or "
                         "lower --resolution, or use --dtype bf16. `cloak methods show NAME` lists batch_size / "
                         "gradient_checkpointing where a method has them")
            return 1
        _output.error(f"{type(exc).__name__}: {exc}")
        if os.environ.get("CLOAK_DEBUG"):
            traceback.print_exc()
        else:
            _output.note("set CLOAK_DEBUG=1 for the traceback")
        return 1


def _interrupted(args: list[str]) -> int:
    """Ctrl-C: one line saying what was kept and the exact command that resumes, exit 130."""
    from cloak.cli import _output
    from cloak.cli._run import interrupted_message

    _output.note(interrupted_message(args))
    return 130


def _out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or MPS's), or a CPU allocation failure, without importing torch."""
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower() or \
        "DefaultCPUAllocator: can't allocate memory" in text


def entry() -> None:
    sys.exit(main())
