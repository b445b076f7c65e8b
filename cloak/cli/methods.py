"""``cloak methods``: what each verb can do, and every option of a method."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cloak.cli import _output
from cloak.cli._options import JsonOpt

def registries() -> dict:
    from cloak.attack import ATTACK
    from cloak.protect import PROTECT
    from cloak.purify import PURIFY
    from cloak.score import SCORE

    regs = {"protect": PROTECT, "purify": PURIFY, "attack": ATTACK, "score": SCORE}
    try:
        from cloak.immunize import IMMUNIZE

        regs["immunize"] = IMMUNIZE
    except ImportError:
        pass
    return regs


HELP = """List the methods of each verb, or explain one: its paper, options, defaults and units.

  cloak methods                 every method of every verb
  cloak methods protect         the methods of one verb
  cloak methods aspl            one method in full (also: cloak methods protect aspl, cloak methods show aspl)
"""


def register(app: typer.Typer) -> None:
    @app.command("methods", help=HELP)
    def methods(
        args: Annotated[Optional[list[str]], typer.Argument(metavar="[VERB] [NAME]", help="A verb, a method "
                                                            "name, or both.")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        from cloak.errors import UsageError
        from cloak.registry import suggest

        args = list(args or [])
        if args and args[0] == "show":
            args = args[1:]
        regs = registries()
        if len(args) > 2:
            raise UsageError("cloak methods takes at most a verb and a name")
        verb = args[0] if args and args[0] in regs else None
        name = args[-1] if args and args[-1] not in regs else None
        if len(args) == 2 and verb is None:
            raise UsageError(f"unknown verb {args[0]!r}{suggest(args[0], list(regs))}; valid: {', '.join(regs)}")
        if name is not None:
            show(name, verb, as_json)
            return
        chosen = {verb: regs[verb]} if verb else regs
        if as_json:
            _output.data_json({v: {e.name: e.summary for e in r.entries()} for v, r in chosen.items()})
            return
        for v, reg in chosen.items():
            for e in reg.entries():
                budget = _budget_text(reg.get(e.name)) if v == "protect" else ""
                _output.data(f"{v}\t{e.name}\t{e.summary}" + (f"\t{budget}" if budget else ""))


def _budgets(cls) -> dict:
    from cloak.adversarial.budget import default_budgets

    return default_budgets(cls.Options)


def _budget_text(cls) -> str:
    """Each ℓ∞ budget's default in the three units: ``eps 6.375/255 = 0.025 (01) = 0.05 (m11)``."""
    return "; ".join(f"{name} {b.all_units()}" for name, b in _budgets(cls).items())


def show(name: str, verb: str | None, as_json: bool) -> None:
    """Every option of a method with its default, unit and help, and the paper it implements."""
    from cloak.errors import UsageError
    from cloak.registry import suggest

    regs = registries()
    found = [(v, r) for v, r in regs.items() if name in r and (verb is None or v == verb)]
    elsewhere = [v for v, r in regs.items() if name in r]
    if not found and elsewhere:
        kinds = " and ".join(f"a{'n' if v[0] in 'aeiou' else ''} {v} {'metric' if v == 'score' else 'method'}"
                             for v in elsewhere)
        raise UsageError(f"{name} is {kinds}, not a {verb} method",
                         hint=f"cloak methods {elsewhere[0]} {name}; `cloak methods {verb}` lists the {verb} methods")
    if not found:
        every = sorted({n for r in regs.values() for n in r.names()})
        raise UsageError(f"no method or metric named {name!r}{suggest(name, every)}")
    for v, reg in found:
        cls = reg.get(name)
        info = {"verb": v, "name": name, "summary": reg.entry(name).summary, **cls.info(),
                "options": cls.option_table()}
        if hasattr(cls, "describe"):
            info.update(cls.describe())
        if budgets := _budgets(cls):
            info["budgets"] = {n: {**b.as_dict(), "01": b.m11 / 2} for n, b in budgets.items()}
        if as_json:
            _output.data_json(info)
            continue
        _output.data(f"{v} {name}: {info['summary']}")
        _output.data(f"  paper: {info.get('paper', '')}")
        _output.data(f"  implements: {info.get('implements', '')}")
        if info.get("notes"):
            _output.data(f"  notes: {info['notes']}")
        if budgets:
            _output.data(f"  default budget: {_budget_text(cls)}")
        rows = info["options"]
        # Defaults as they are typed after -o (lists comma-separated); a unit names the option that holds
        # it (eps is in `unit`), so it shows that option's default.
        typed = {row["name"]: ",".join(map(str, d)) if isinstance(d := row["default"], list) else str(d)
                 for row in rows}
        settings = [f"{row['name']}={typed[row['name']]}" for row in rows]
        kinds = [row["type"] + (f" [{typed.get(row['unit'], row['unit'])}]" if row["unit"] else "") for row in rows]
        width = min(max(map(len, settings), default=0), 40)  # one column, unless a default is very long
        kind_width = min(max(map(len, kinds), default=0), 18)
        for setting, kind, row in zip(settings, kinds, rows):
            prop = " (proposed default)" if row["proposal"] else ""
            _output.data(f"  -o {setting:<{width}}  {kind:<{kind_width}}  {row['help']}{prop}")
