"""Budgets with explicit units.

``m11``: in [-1, 1] pixel space (Anti-DreamBooth's η = 0.05); ``01``: in [0, 1] space; ``255``: in
0–255 levels. 0.05 (m11) = 0.025 (01) = 6.375 (255). Every method states its defaults with a unit and
the report records both the given value and the m11 value used.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloak.errors import UsageError

UNITS = ("m11", "01", "255")
_TO_M11 = {"m11": 1.0, "01": 2.0, "255": 2.0 / 255.0}


def to_m11(value: float, unit: str) -> float:
    if unit not in _TO_M11:
        raise UsageError(f"unknown budget unit {unit!r}; valid: {', '.join(UNITS)}")
    if value < 0:
        raise UsageError(f"budget must be non-negative, got {value}")
    return float(value) * _TO_M11[unit]


def from_m11(value: float, unit: str) -> float:
    return float(value) / _TO_M11[unit]


@dataclass(frozen=True)
class Budget:
    value: float
    unit: str

    @property
    def m11(self) -> float:
        return to_m11(self.value, self.unit)

    def describe(self) -> str:
        return (f"{self.value:g} ({self.unit}) = {self.m11:.5g} in [-1,1] = {from_m11(self.m11, '255'):.4g}/255")

    def as_dict(self) -> dict:
        return {"value": self.value, "unit": self.unit, "m11": self.m11, "levels_255": from_m11(self.m11, "255")}
