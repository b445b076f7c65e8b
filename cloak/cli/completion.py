"""``cloak completion SHELL``: print the shell completion script."""

from __future__ import annotations

from typing import Annotated

import typer

from cloak.cli import _output

HELP = """Print the completion script for bash, zsh or fish.

  bash:  cloak completion bash > ~/.local/share/bash-completion/completions/cloak
  zsh:   cloak completion zsh > "${fpath[1]}/_cloak"
  fish:  cloak completion fish > ~/.config/fish/completions/cloak.fish
"""


def register(app: typer.Typer) -> None:
    @app.command("completion", help=HELP)
    def completion(shell: Annotated[str, typer.Argument(help="bash, zsh or fish.")]) -> None:
        from cloak.cli import _docs
        from cloak.errors import UsageError

        makers = {"bash": _docs.bash, "zsh": _docs.zsh, "fish": _docs.fish}
        if shell not in makers:
            raise UsageError(f"unknown shell {shell!r}; valid: bash, zsh, fish")
        _output.data(makers[shell]())
