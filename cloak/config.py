"""Configuration: flag > environment (context only) > cloak.toml > method default.

``cloak.toml`` is looked for at ``--config``, then ``$CLOAK_CONFIG``, then ``./cloak.toml``, then
``$XDG_CONFIG_HOME/cloak/cloak.toml``. Sections::

    [defaults]          device, dtype, seed, cache_dir
    [models]            id = "/local/diffusers/dir"      (overrides the cache for that id)
    [protect]           flag defaults for the verb (method, eps, eps_unit, resolution, ...)
    [protect.aspl]      options of one method (beaten by -o key=value)
    [score]             metrics, fail_if = ["ism>0.35"], ...

Every resolved value remembers where it came from, and the report records it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloak.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from cloak.registry import suggest

VERBS = ("protect", "immunize", "purify", "attack", "score")
# Environment variables carry context only, never hyper-parameters (STYLE.md).
ENV_VARS = {"device": "CLOAK_DEVICE", "cache_dir": "CLOAK_CACHE_DIR", "offline": "CLOAK_OFFLINE", "debug": "CLOAK_DEBUG"}
DEFAULT_KEYS = {"device", "dtype", "seed", "cache_dir"}


@dataclass
class Value:
    value: Any
    source: str  # "flag" | "env" | "config" | "default" | "-o"

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source}


@dataclass
class Config:
    path: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def defaults(self) -> dict[str, Any]:
        return self.data.get("defaults", {})

    @property
    def models(self) -> dict[str, str]:
        return self.data.get("models", {})

    def verb(self, verb: str) -> dict[str, Any]:
        return {k: v for k, v in self.data.get(verb, {}).items() if not isinstance(v, dict)}

    def method(self, verb: str, method: str) -> dict[str, Any]:
        sub = self.data.get(verb, {}).get(method, {})
        return sub if isinstance(sub, dict) else {}

    def resolve(self, verb: str, key: str, flag_value: Any, default: Any) -> Value:
        """One common flag: flag > env (context keys only) > [verb] > [defaults] > default."""
        if flag_value is not None:
            return Value(flag_value, "flag")
        env = ENV_VARS.get(key)
        if env and os.environ.get(env):
            return Value(os.environ[env], "env")
        if key in self.verb(verb):
            return Value(self.verb(verb)[key], "config")
        if key in DEFAULT_KEYS and key in self.defaults:
            return Value(self.defaults[key], "config")
        return Value(default, "default")


def config_search_path(explicit: str | None) -> list[Path]:
    if explicit:
        return [Path(explicit).expanduser()]
    paths = []
    if os.environ.get("CLOAK_CONFIG"):
        return [Path(os.environ["CLOAK_CONFIG"]).expanduser()]
    paths.append(Path.cwd() / "cloak.toml")
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser()
    paths.append(xdg / "cloak" / "cloak.toml")
    return paths


def load_config(explicit: str | None = None) -> Config:
    for path in config_search_path(explicit):
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot parse config {path}: {exc}") from None
            _check_sections(path, data)
            return Config(path, data)
        if explicit:
            raise UsageError(f"config file {path} does not exist")
    return Config()


def _check_sections(path: Path, data: dict[str, Any]) -> None:
    known = ["defaults", "models", *VERBS]
    for key in data:
        if key not in known:
            raise UsageError(f"{path}: unknown section [{key}]{suggest(key, known)}; valid: {', '.join(known)}")
    for key in data.get("defaults", {}):
        if key not in DEFAULT_KEYS:
            raise UsageError(f"{path}: unknown key defaults.{key}{suggest(key, sorted(DEFAULT_KEYS))}")


def cache_dir(flag: str | None = None) -> Path:
    """``--cache-dir`` > ``CLOAK_CACHE_DIR`` > ``$XDG_CACHE_HOME/cloak`` (never the package dir)."""
    if flag:
        return Path(flag).expanduser()
    if os.environ.get("CLOAK_CACHE_DIR"):
        return Path(os.environ["CLOAK_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "cloak"
