"""The versioned JSON report every verb writes (``report.json``; schema ``cloak.report/1``).

Within a schema version fields are only ever added, never renamed or removed, so scripts that
read reports keep working.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cloak import __version__
from cloak.io.images import write_bytes_atomic

SCHEMA = "cloak.report/1"


class _Readable:
    """Read a record as a dict too (``report["summary"]``, ``item["status"]``), by its JSON field names."""

    def _field(self, key: str) -> str:
        for name, info in type(self).model_fields.items():
            if key in (name, info.alias):
                return name
        if key in (self.__pydantic_extra__ or {}):
            return key
        raise KeyError(key)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, self._field(key))

    def __contains__(self, key: object) -> bool:
        try:
            self._field(key)  # type: ignore[arg-type]
        except (KeyError, TypeError):
            return False
        return True

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        return list(self.model_dump(by_alias=True))

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON types, as in ``report.json``."""
        return self.model_dump(by_alias=True, mode="json")


class ModelRecord(_Readable, BaseModel):
    role: str
    id: str
    path: str | None = None
    revision: str | None = None
    sha256: str | None = None
    stand_in: bool = False  # random weights: protects and measures nothing


class ItemRecord(_Readable, BaseModel):
    model_config = ConfigDict(extra="allow")  # per-item figures (linf, lpips, metric values, ...)
    input: str | None = None
    output: str | None = None
    status: str = "ok"  # ok | failed | skipped
    seconds: float | None = None
    error: str | None = None


class Report(_Readable, BaseModel):
    schema_: str = Field(SCHEMA, alias="schema")
    cloak_version: str = __version__
    verb: str
    method: str | None = None
    method_info: dict[str, Any] = Field(default_factory=dict)  # paper, implementation notes, proposals
    argv: list[str] = Field(default_factory=list)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name → {value, source}
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # common flags → {value, source, unit?}
    models: list[ModelRecord] = Field(default_factory=list)
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    started: str = ""
    seconds: float = 0.0
    warnings: list[str] = Field(default_factory=list)
    items: list[ItemRecord] = Field(default_factory=list)
    summary: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=2, sort_keys=False) + "\n"

    def write(self, out_dir: Path, name: str = "report.json") -> Path:
        path = Path(out_dir) / name
        write_bytes_atomic(path, self.to_json().encode("utf-8"))
        return path


def merge_earlier(report: Report, path: Path) -> Report:
    """A resumed run's report, merged with the report of the run it resumed (``path``).

    Items this run skipped because an earlier run had made them keep that run's record (figures,
    seconds; ``kept_from`` names the earlier run's start), the earlier run's models and warnings stay
    (a stand-in warning is never lost), and summary figures this run could not compute (``None`` or
    absent: nothing was done) keep their earlier values. Counts are recomputed over the merged items.
    An unreadable earlier report, or one of another verb, is ignored.
    """
    try:
        earlier = Report.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return report
    if earlier.verb != report.verb:
        return report
    done = {item.output: item for item in earlier.items if item.status == "ok" and item.output}
    items, kept = [], 0
    for item in report.items:
        before = done.get(item.output) if item.status == "skipped" else None
        if before is not None:
            kept_from = before.model_extra.get("kept_from") or earlier.started
            item = ItemRecord(**{**before.model_dump(), "kept_from": kept_from})
            kept += 1
        items.append(item)
    if not kept:
        return report
    roles = {(m.role, m.id) for m in report.models}
    models = report.models + [m for m in earlier.models if (m.role, m.id) not in roles]
    warnings = report.warnings + [w for w in earlier.warnings if w not in report.warnings]
    summary = dict(report.summary)
    for key, value in earlier.summary.items():
        if summary.get(key) is None:
            summary[key] = value
    summary.update({s: sum(1 for i in items if i.status == s) for s in ("ok", "failed", "skipped")})
    summary["stand_in"] = bool(report.summary.get("stand_in")) or any(m.stand_in for m in models)
    summary["kept_from_earlier"] = kept
    return report.model_copy(update={"items": items, "models": models, "warnings": warnings, "summary": summary})


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "cloak": __version__}
    for mod in ("torch", "diffusers", "transformers", "numpy", "PIL"):
        module = sys.modules.get(mod)
        if module is not None and hasattr(module, "__version__"):
            found[mod] = str(module.__version__)
    return found


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 4)
