"""``--fail-if`` gates: a tiny expression language, parsed without eval.

Grammar::

    gate    := clause (("and" | "or") clause)*        (and binds tighter than or)
    clause  := operand OP operand
    operand := METRIC | METRIC "." STAT | NUMBER       STAT ∈ {mean, std, n}  (default mean)
    OP      := "<" | "<=" | ">" | ">=" | "==" | "!="

A gate *fails* when its expression is true: ``--fail-if 'ism>0.35'`` fails the run when the mean ISM
is above 0.35. A gate that reads an undefined value (None or NaN: PSNR of identical images, NIQE of
images too small for it, ISM without faces) fails too, unless ``undefined="pass"`` (``--undefined
pass``): a CI gate must not pass because nothing could be measured. Metric names are matched
without regard to case (``ISM`` is ``ism``).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from cloak.errors import UsageError

OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt,
       ">": operator.gt}
STATS = ("mean", "std", "n")
UNDEFINED = ("fail", "pass")
_TOKEN = re.compile(r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<op><=|>=|==|!=|<|>)|"
                    r"(?P<word>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_]+)?))")


@dataclass(frozen=True)
class Operand:
    metric: str | None
    stat: str
    number: float | None

    def value(self, table: dict[str, dict]) -> float | None:
        if self.metric is None:
            return self.number
        return table[self.metric].get(self.stat)

    def __str__(self) -> str:
        if self.metric is None:
            return f"{self.number:g}"
        return self.metric if self.stat == "mean" else f"{self.metric}.{self.stat}"


@dataclass(frozen=True)
class Clause:
    left: Operand
    op: str
    right: Operand


@dataclass(frozen=True)
class Gate:
    text: str
    groups: tuple[tuple[Clause, ...], ...]  # OR of ANDs

    def metrics(self) -> set[str]:
        return {o.metric for g in self.groups for c in g for o in (c.left, c.right) if o.metric}

    def evaluate(self, table: dict[str, dict], undefined: str = "fail") -> tuple[bool, str]:
        """(failed, explanation). An undefined operand (None, NaN) fails the gate unless ``undefined="pass"``,
        where the clause reading it is false."""
        if undefined not in UNDEFINED:
            raise UsageError(f"--undefined {undefined!r}; valid: {', '.join(UNDEFINED)}")
        parts = []
        any_group = False
        missing = False
        for group in self.groups:
            group_true = True
            for c in group:
                lv, rv = _defined(c.left.value(table)), _defined(c.right.value(table))
                missing = missing or lv is None or rv is None
                ok = lv is not None and rv is not None and OPS[c.op](lv, rv)
                parts.append(f"{_show(c.left, lv)} {c.op} {_show(c.right, rv)}")
                group_true = group_true and ok
            any_group = any_group or group_true
        why = ", ".join(parts)
        if missing and undefined == "fail":
            return True, why + "; an undefined value fails the gate (--undefined pass lets it pass)"
        return any_group, why


def _defined(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _fmt(v) -> str:
    return "undefined" if v is None else f"{v:.4g}"


def _show(operand: Operand, value) -> str:
    return f"{operand}={_fmt(value)}" if operand.metric else _fmt(value)


def parse_gate(text: str, known_metrics: list[str] | None = None) -> Gate:
    tokens = _tokenize(text)
    groups: list[list[Clause]] = [[]]
    i = 0
    while True:
        if i + 3 > len(tokens):
            raise UsageError(f"--fail-if {text!r}: expected 'METRIC OP NUMBER' (e.g. 'ism>0.35')")
        (lk, lv), (ok, ov), (rk, rv) = tokens[i:i + 3]
        if ok != "op" or lk == "op" or rk == "op":
            raise UsageError(f"--fail-if {text!r}: expected a comparison like 'ism>0.35' near {lv!r}")
        left, right = _operand(lk, lv, text, known_metrics), _operand(rk, rv, text, known_metrics)
        if left.metric is None and right.metric is None:
            raise UsageError(f"--fail-if {text!r}: a comparison needs a metric name")
        groups[-1].append(Clause(left, ov, right))
        i += 3
        if i == len(tokens):
            break
        kind, word = tokens[i]
        if kind == "word" and word.lower() == "and":
            i += 1
        elif kind == "word" and word.lower() == "or":
            groups.append([])
            i += 1
        elif kind == "op":
            raise UsageError(f"--fail-if {text!r}: one comparison per clause; write 'a<x and x<b', not 'a<x<b'")
        else:
            raise UsageError(f"--fail-if {text!r}: expected 'and' or 'or' before {word!r}")
    return Gate(text, tuple(tuple(g) for g in groups))


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text_stripped = text.rstrip()
    while pos < len(text_stripped):
        m = _TOKEN.match(text_stripped, pos)
        if not m or m.end() == pos:
            raise UsageError(f"--fail-if {text!r}: unexpected character at position {pos + 1}: {text[pos:pos + 8]!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    if not tokens:
        raise UsageError("--fail-if: empty expression")
    return tokens


def _operand(kind: str, value: str, text: str, known: list[str] | None) -> Operand:
    if kind == "num":
        return Operand(None, "mean", float(value))
    metric, _, stat = value.partition(".")
    stat = stat or "mean"
    if stat not in STATS:
        raise UsageError(f"--fail-if {text!r}: unknown statistic {stat!r}; valid: {', '.join(STATS)}")
    if known is not None:
        from cloak.score import SCORE

        if metric_name(metric, SCORE.names(), None, strict=False) is not None and \
                metric_name(metric, known, None, strict=False) is None:
            canonical = metric_name(metric, SCORE.names(), None)
            raise UsageError(f"--fail-if {text!r}: metric {canonical!r} is not being computed",
                             hint=f"add --metric {canonical} (selected: {', '.join(known)})")
        metric = metric_name(metric, known, f"--fail-if {text!r}")
    return Operand(metric, stat, None)


def metric_name(name: str, known: list[str], where: str | None, *, strict: bool = True) -> str | None:
    """``name`` as spelled in ``known``, matched without regard to case (``ISM`` → ``ism``).

    Unknown: a usage error with a suggestion (``strict``), or None.
    """
    if name in known:
        return name
    folded = {k.lower(): k for k in known}
    if name.lower() in folded:
        return folded[name.lower()]
    if name.replace("_", "-").lower() in folded:
        return folded[name.replace("_", "-").lower()]
    if not strict:
        return None
    from cloak.registry import suggest

    close = suggest(name.lower(), list(folded))
    raise UsageError(f"{where + ': ' if where else ''}unknown metric {name!r}{close}; valid: {', '.join(known)}")
