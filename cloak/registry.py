"""Name → method-class registries, lazy so that ``cloak --help`` never imports torch.

Each verb package declares its methods with ``register_lazy(name, "module:Class", summary)``; the
class is imported only when the method is used (the pyiqa/timm pattern).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from cloak.errors import UsageError


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "package.module:Class"
    summary: str


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._loaded: dict[str, Any] = {}

    def register_lazy(self, name: str, target: str, summary: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} method {name!r} registered twice")
        self._entries[name] = Entry(name, target, summary)

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise UsageError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        msg = f"unknown {self.kind} method {name!r}; valid: {', '.join(self.names())}"
        close = difflib.get_close_matches(name, self.names(), n=1)
        return msg + (f" (did you mean {close[0]!r}?)" if close else "")

    def get(self, name: str) -> Any:
        """The method class, imported on first use."""
        if name not in self._loaded:
            module_name, _, attr = self.entry(name).target.partition(":")
            cls = getattr(importlib.import_module(module_name), attr)
            cls.name = name
            self._loaded[name] = cls
        return self._loaded[name]


def suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
