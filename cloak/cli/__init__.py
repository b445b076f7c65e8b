"""The ``cloak`` command. Imports no torch: every verb imports its machinery when it runs.

``main()`` is the only place where errors become exit codes (ARCHITECTURE §5):
0 ok · 1 runtime error · 2 usage/config · 3 bad input · 4 model unavailable · 5 partial failure ·
6 score gate failed · 130 interrupted.
"""

from __future__ import annotations

import os
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
    from cloak.cli import attack, completion, config_cmd, immunize, methods, models, protect, purify, score

    for module in (protect, immunize, purify, attack, score, methods):
        module.register(app)
    app.add_typer(models.app, name="models")
    app.add_typer(config_cmd.app, name="config")
    completion.register(app)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and map errors to exit codes."""
    from cloak.cli._output import err
    from cloak.errors import CloakError

    args = sys.argv[1:] if argv is None else argv
    try:
        rv = app(args=args, prog_name="cloak", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except CloakError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        if os.environ.get("CLOAK_DEBUG"):
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except typer.TyperException as exc:  # usage errors from the (vendored) click parser
        if hasattr(exc, "show"):
            exc.show(file=sys.stderr)
        else:
            err.print(f"[red]error:[/red] {exc.format_message()}")
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 — last resort: one line, traceback with CLOAK_DEBUG
        if _out_of_memory(exc):
            err.print(f"[red]error:[/red] out of memory: {str(exc).splitlines()[0]}", soft_wrap=True)
            err.print("hint: aspl, fsmg, simac and cap take -o pgd_batch=N (N images per UNet pass, "
                      "the same step up to rounding); "
                      "metacloak and dladiff put the whole set in one batch: protect fewer images per run; or lower "
                      "--resolution, or use --dtype bf16. `cloak methods show NAME` lists batch_size / "
                      "gradient_checkpointing where a method has them", soft_wrap=True)
            return 1
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        if os.environ.get("CLOAK_DEBUG"):
            traceback.print_exc()
        else:
            err.print("set CLOAK_DEBUG=1 for the traceback")
        return 1


def _out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or MPS's), or a CPU allocation failure, without importing torch."""
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower() or \
        "DefaultCPUAllocator: can't allocate memory" in text


def entry() -> None:
    sys.exit(main())
