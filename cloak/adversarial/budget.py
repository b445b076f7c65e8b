"""Budgets with explicit units.

``m11``: in [-1, 1] pixel space (Anti-DreamBooth's η = 0.05); ``01``: in [0, 1] space; ``255``: in
0–255 levels. 0.05 (m11) = 0.025 (01) = 6.375 (255). Every method states its defaults with a unit and
the report records both the given value and the m11 value used.

A budget the user types always carries its unit, so ``8`` can never mean 8 in [-1, 1] (the whole
range). Three spellings::

    8/255           8-bit levels
    8lv, 8levels    the same
    0.03            only with a unit given beside it: --eps-unit 01, -o unit=01, unit = "01" in cloak.toml

The saved PNGs move each pixel by whole 8-bit levels, so a budget under one level writes the inputs
unchanged: it is refused, as is a budget above :data:`MAX_LEVELS` without ``--force-budget``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cloak.errors import UsageError

UNITS = ("m11", "01", "255")
_TO_M11 = {"m11": 1.0, "01": 2.0, "255": 2.0 / 255.0}
# Above this many 8-bit levels a perturbation is plainly visible (the papers use 4–16/255).
MAX_LEVELS = 32
SPELLINGS = "8/255 or 8lv (8-bit levels), or a plain number with its unit given beside it (0.03 with unit 01)"
_LITERAL = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)\s*"
                      r"(?:(?P<per255>/\s*255)|(?P<levels>lv|levels?))?\s*$", re.IGNORECASE)


def to_m11(value: float, unit: str) -> float:
    if unit not in _TO_M11:
        raise UsageError(f"unknown budget unit {unit!r}; valid: {', '.join(UNITS)}")
    if value < 0:
        raise UsageError(f"budget must be non-negative, got {value}")
    return float(value) * _TO_M11[unit]


def from_m11(value: float, unit: str) -> float:
    return float(value) / _TO_M11[unit]


def levels(m11: float) -> int:
    """Whole 8-bit levels a budget allows after rounding (as ``quantize_within_budget`` clamps them)."""
    return int(m11 * 127.5 + 1e-6)


@dataclass(frozen=True)
class Budget:
    value: float
    unit: str

    @property
    def m11(self) -> float:
        return to_m11(self.value, self.unit)

    def describe(self) -> str:
        return (f"{self.value:g} ({self.unit}) = {self.m11:.5g} in [-1,1] = {from_m11(self.m11, '255'):.4g}/255")

    def all_units(self) -> str:
        """The budget in the three units, 255 first: ``6.375/255 = 0.025 (01) = 0.05 (m11)``."""
        m11 = self.m11
        return f"{from_m11(m11, '255'):.4g}/255 = {from_m11(m11, '01'):.4g} (01) = {m11:.4g} (m11)"

    def as_dict(self) -> dict:
        return {"value": self.value, "unit": self.unit, "m11": self.m11, "levels_255": from_m11(self.m11, "255")}


def parse_literal(value: Any, what: str) -> tuple[float, str | None]:
    """``"8/255"``/``"8lv"`` → (8, "255"); ``"0.03"`` or ``0.03`` → (0.03, None): the unit is still to come."""
    if isinstance(value, bool):
        raise UsageError(f"{what} = {value!r} is not a budget; write {SPELLINGS}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise UsageError(f"{what} = {value!r}: a budget must be non-negative")
        return float(value), None
    m = _LITERAL.match(str(value))
    if not m:
        raise UsageError(f"{what} = {str(value)!r} is not a budget; write {SPELLINGS}")
    return float(m.group("num")), ("255" if m.group("per255") or m.group("levels") else None)


def _check_unit(unit: Any, what: str) -> str:
    if unit not in UNITS:
        raise UsageError(f"unknown unit {unit!r} for {what}; valid: {', '.join(UNITS)}")
    return unit


def parse_budget(value: Any, unit: str | None = None, *, what: str = "--eps", unit_flag: str = "--eps-unit") -> Budget:
    """A budget from what the user typed: a literal with its unit, or a number with ``unit`` beside it."""
    number, own_unit = parse_literal(value, what)
    if unit is not None:
        _check_unit(unit, unit_flag)
    if own_unit is None and unit is None:
        raise UsageError(f"{what} {value}: a budget needs its unit, so that 8 cannot mean 8 in [-1,1] (the "
                         f"whole range)", hint=f"write {what} 8/255, {what} 8lv, or {what} 0.03 {unit_flag} 01 "
                                               f"(units: m11 = [-1,1], 01 = [0,1], 255 = 8-bit levels)")
    if own_unit is not None and unit is not None and unit != own_unit:
        raise UsageError(f"{what} {value} is in 8-bit levels but {unit_flag} says {unit}; give one unit")
    return Budget(number, own_unit or unit)


def check_budget(m11: float, what: str, *, force: bool = False) -> None:
    """Refuse a budget the 8-bit output cannot hold (under one level) or a visible one without ``force``."""
    shown = f"{from_m11(m11, '255'):.4g}/255"
    if levels(m11) < 1:
        raise UsageError(f"{what} {shown} is under one 8-bit level: the saved PNGs would equal the inputs",
                         hint="the smallest budget that changes a PNG is 1/255 (1lv); the papers use 4–16/255")
    if levels(m11) > MAX_LEVELS and not force:
        raise UsageError(f"{what} {shown} is above {MAX_LEVELS}/255: the perturbation would be plainly visible",
                         hint="pass --force-budget (or force_budget = true in cloak.toml) if you mean it")


def budget_fields(options_cls) -> dict[str, str]:
    """{budget option: the option that holds its unit} (eps → unit, alpha → unit, eps_zs → zs_unit)."""
    out = {}
    for name, f in options_cls.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        unit_key = extra.get("unit")
        if unit_key in options_cls.model_fields and options_cls.model_fields[unit_key].default in UNITS:
            out[name] = unit_key
    return out


def normalize_budget_layers(options_cls, layers: list[tuple[str, dict[str, Any]]],
                            method: str) -> list[tuple[str, dict[str, Any]]]:
    """Make every budget option in the layers (config, flags, -o; lowest first) a number in the final unit.

    A value is read in the unit its own layer gives (a literal's own unit, or ``unit=`` beside it), else in
    the unit set by another layer; a plain number with no unit anywhere is ambiguous and refused. Values
    are then converted to the unit in effect, so ``--eps 8/255 -o unit=m11`` still means 8 levels.
    """
    pairs = budget_fields(options_cls)
    if not pairs:
        return layers
    fields = options_cls.model_fields
    out = [(source, dict(values)) for source, values in layers]
    for unit_key in sorted(set(pairs.values())):
        explicit = [values[unit_key] for _, values in out if unit_key in values and values[unit_key] is not None]
        for u in explicit:
            _check_unit(u, f"{method} option {unit_key}")
        final = explicit[-1] if explicit else fields[unit_key].default
        for source, values in out:
            for name in (n for n, k in pairs.items() if k == unit_key and n in values):
                what = f"{method}: {_where(source)} {name}"
                number, own = parse_literal(values[name], what)
                layer_unit = values.get(unit_key)
                if own is not None and layer_unit is not None and layer_unit != own:
                    raise UsageError(f"{what} = {values[name]!r} is in 8-bit levels but {unit_key} = {layer_unit!r}"
                                     f" beside it; give one unit")
                unit = own or layer_unit or (final if explicit else None)
                if unit is None:
                    raise UsageError(f"{what} = {values[name]!r} has no unit (the default unit of {method} is "
                                     f"{final}, easy to mistake)",
                                     hint=f"write {name}=8/255 or {name}=8lv, or set {unit_key}=m11|01|255 with it")
                values[name] = number if unit == final else from_m11(to_m11(number, unit), final)
        default_unit = fields[unit_key].default
        if final != default_unit:
            # -o unit=255 alone must not reread the default 0.05 (m11) as 0.05 levels: defaults follow the unit.
            unset = {name: from_m11(to_m11(fields[name].default, default_unit), final)
                     for name, key in pairs.items()
                     if key == unit_key and isinstance(fields[name].default, (int, float))
                     and not any(name in values for _, values in out)}
            if unset:
                out.insert(0, ("default", unset))
    return out


def _where(source: str) -> str:
    return {"-o": "-o", "config": "cloak.toml", "flag": "flag"}.get(source, source)


def budget_flag_layer(options_cls, method: str, eps: Any, eps_unit: str | None) -> dict[str, Any]:
    """The ``--eps``/``--eps-unit`` layer: eps and unit together (the default step follows the unit, as
    :func:`normalize_budget_layers` converts defaults)."""
    if eps is None:
        if eps_unit is not None:
            _check_unit(eps_unit, "--eps-unit")
            raise UsageError("--eps-unit is the unit of --eps: give --eps too (e.g. --eps 0.03 --eps-unit 01)",
                             hint="to change only the unit of the method's options, use -o unit=...")
        return {}
    fields = options_cls.model_fields
    if "eps" not in fields or "unit" not in fields:
        raise UsageError(f"{method} has no ℓ∞ budget for --eps")
    budget = parse_budget(eps, eps_unit)
    return {"eps": budget.value, "unit": budget.unit}


def check_options_budget(opts, method: str, *, force: bool = False) -> None:
    """Every ℓ∞ budget (``eps``, ``eps_zs``, ...) of resolved options: at least one level, at most 32 unforced."""
    for name, unit_key in budget_fields(type(opts)).items():
        if name.startswith("eps"):
            check_budget(to_m11(getattr(opts, name), getattr(opts, unit_key)), f"{method} {name}", force=force)


def default_budgets(options_cls) -> dict[str, Budget]:
    """Each ℓ∞ budget option's default, with its unit (for ``--help`` and ``cloak methods``)."""
    fields = options_cls.model_fields
    return {name: Budget(fields[name].default, fields[unit_key].default)
            for name, unit_key in budget_fields(options_cls).items()
            if name.startswith("eps") and isinstance(fields[name].default, (int, float))}


def unchanged_error(saved, original) -> str | None:
    """Why an output is not a protection: its 8-bit levels equal the input's (None when it differs).

    The protect pipeline records such an item as failed instead of ok.
    """
    import torch

    if torch.equal(saved.to(torch.int16), original.to(torch.int16)):
        return "the protected image is identical to its input (no 8-bit level changed); nothing was protected"
    return None
