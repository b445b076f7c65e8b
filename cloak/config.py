"""Configuration: flag > environment (context only) > cloak.toml > method default.

``cloak.toml`` is looked for at ``--config``, then ``$CLOAK_CONFIG``, then ``./cloak.toml``, then
``$XDG_CONFIG_HOME/cloak/cloak.toml``. Sections::

    [defaults]          device, dtype, seed, cache_dir
    [models]            id = "/local/diffusers/dir"      (overrides the cache for that id)
    [protect]           flag defaults for the verb (method, eps, eps_unit, resolution, ...)
    [protect.aspl]      options of one method (beaten by -o key=value)
    [score]             metrics, fail_if = ["ism>0.35"], ...

Every resolved value remembers where it came from, and the report records it. The whole file is
validated when it is loaded (:func:`validate`): sections, keys and their types, method names and each
method's options (through its ``Options``), every message naming the file and the key.
"""

from __future__ import annotations

import math
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
            validate(path, data)
            return Config(path, data)
        if explicit:
            raise UsageError(f"config file {path} does not exist")
    return Config()


# Keys of a verb's section: the flags every verb reads through VerbRun, then each verb's own.
COMMON_VERB_KEYS = {"method": "str", "model": "str", "effort": "number", "seed": "int", "device": "str",
                    "dtype": "str", "resolution": "int"}
VERB_KEYS: dict[str, dict[str, str]] = {
    "protect": {"eps": "budget", "eps_unit": "str", "force_budget": "bool", "keep_metadata": "bool"},
    "purify": {"keep_metadata": "bool"},
    "immunize": {"checkpoint_every": "int"},
    "attack": {},
    "score": {"metrics": "str_list", "fail_if": "str_list", "sheet": "str", "per_subdir": "bool",
              "undefined": "str"},
}
DEFAULT_TYPES = {"device": "str", "dtype": "str", "seed": "int", "cache_dir": "str"}
CHOICES = {"dtype": ("fp32", "bf16", "fp16"), "eps_unit": ("m11", "01", "255"), "undefined": ("fail", "pass")}
_TYPE_TEXT = {"str": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
              "str_list": 'a string or a list of strings (e.g. ["a", "b"])', "budget": 'a budget such as "8/255"'}


def check_type(value: Any, kind: str) -> bool:
    """Whether a TOML value has the type a key needs (a bool is never a number, "false" never a bool)."""
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str_list":
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if kind == "budget":
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    raise ValueError(kind)


def key_error(path: Path | str | None, key: str, value: Any, kind: str) -> UsageError:
    where = f"{path}: " if path else ""
    return UsageError(f"{where}{key} = {_show(value)} must be {_TYPE_TEXT[kind]}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def validate(path: Path, data: dict[str, Any]) -> None:
    """Check the whole file at load: sections, keys, value types, method names and method options.

    Every message names the file and the key (``cloak.toml: protect.aspll``), with "did you mean".
    """
    known = ["defaults", "models", *VERBS]
    for section, body in data.items():
        if section not in known:
            raise UsageError(f"{path}: unknown section {section!r}{suggest(section, known)}; "
                             f"valid: {', '.join(known)}")
        if not isinstance(body, dict):
            raise UsageError(f"{path}: {section} must be a section ([{section}]), got {section} = {_show(body)}")
    for key, value in data.get("defaults", {}).items():
        if key not in DEFAULT_KEYS:
            raise UsageError(f"{path}: unknown key defaults.{key}{suggest(key, sorted(DEFAULT_KEYS))}; "
                             f"valid: {', '.join(sorted(DEFAULT_KEYS))}")
        _check_value(path, f"defaults.{key}", key, value, DEFAULT_TYPES[key])
    for key, value in data.get("models", {}).items():
        if not isinstance(value, str):
            raise UsageError(f"{path}: models.{key} = {_show(value)} must be the path of a local model directory")
    for verb in VERBS:
        _validate_verb(path, verb, data.get(verb, {}))


def _check_value(path: Path, dotted: str, key: str, value: Any, kind: str) -> None:
    if not check_type(value, kind):
        raise key_error(path, dotted, value, kind)
    choices = CHOICES.get(key)
    if choices and value not in choices:
        raise UsageError(f"{path}: {dotted} = {_show(value)}{suggest(str(value), list(choices))}; "
                         f"valid: {', '.join(choices)}")


# --effort multiplies a method's step counts: inf (or 1e400, which parses as inf) would pass "> 0" and crash
# minutes later turning a scaled step count into an int, and anything past this bound runs for years.
MAX_EFFORT = 1000.0


def effort_problem(value: float) -> str | None:
    """Why ``value`` is not a usable effort, or None; the flag, cloak.toml and eval plans all ask here."""
    if value > 0 and math.isfinite(value) and value <= MAX_EFFORT:
        return None
    return f"must be a finite number > 0 and at most {MAX_EFFORT:g} (a multiple of the method's own step counts), " \
           f"got {value}"


def _validate_verb(path: Path, verb: str, section: dict[str, Any]) -> None:
    import importlib

    try:
        registry = getattr(importlib.import_module(f"cloak.{verb}"), verb.upper())
    except ImportError:  # a verb whose optional dependencies are missing: its own run says so
        return
    keys = {**COMMON_VERB_KEYS, **VERB_KEYS[verb]}
    methods = registry.names()
    for key, value in section.items():
        if isinstance(value, dict) and key in keys:  # fail_if = {a = 1}: a table where a value belongs
            raise key_error(path, f"{verb}.{key}", value, keys[key])
        if isinstance(value, dict):  # [verb.method]: that method's options
            if key not in methods:
                kind = "metric" if verb == "score" else f"{verb} method"
                close = suggest(key, methods) or suggest(key.lower(), methods)
                raise UsageError(f"{path}: section {verb}.{key}: unknown {kind} {key!r}{close}; "
                                 f"valid: {', '.join(methods)}")
            _validate_options(path, verb, key, value, registry)
            continue
        if key not in keys:
            raise UsageError(f"{path}: unknown key {verb}.{key}{suggest(key, sorted(keys))}; "
                             f"valid: {', '.join(sorted(keys))}, or a section {verb}.METHOD for method options")
        _check_value(path, f"{verb}.{key}", key, value, keys[key])
        if key == "method" and value not in methods:
            raise UsageError(f"{path}: {verb}.method = {value!r}: unknown {verb} method{suggest(value, methods)}; "
                             f"valid: {', '.join(methods)}")
        if key == "effort" and (problem := effort_problem(value)):
            raise UsageError(f"{path}: {verb}.effort {problem}")
    if verb == "protect" and "eps" in section:
        from cloak.adversarial.budget import parse_budget

        parse_budget(section["eps"], section.get("eps_unit"), what=f"{path}: protect.eps", unit_flag="eps_unit")
    elif verb == "protect" and "eps_unit" in section:
        raise UsageError(f"{path}: protect.eps_unit is the unit of protect.eps; set eps too, or the method's unit "
                         "option in its own section")
    if verb == "score":
        _validate_score(path, section, methods)


def _validate_options(path: Path, verb: str, method: str, values: dict[str, Any], registry) -> None:
    from cloak.methods import build_options

    try:
        build_options(registry.get(method).Options, [("config", values)], method)
    except UsageError as exc:
        raise UsageError(f"{path}: section {verb}.{method}: {exc}") from None


def _validate_score(path: Path, section: dict[str, Any], metrics: list[str]) -> None:
    from cloak.score.gates import metric_name, parse_gate

    if "metrics" in section:
        names = section["metrics"]
        for name in [n.strip() for n in names.split(",")] if isinstance(names, str) else names:
            metric_name(name, metrics, f"{path}: score.metrics")
    gates = section.get("fail_if", [])
    for text in [gates] if isinstance(gates, str) else gates:
        try:
            parse_gate(text, metrics)
        except UsageError as exc:
            raise UsageError(f"{path}: score.fail_if: {exc}") from None


def cache_dir(flag: str | None = None) -> Path:
    """``--cache-dir`` > ``CLOAK_CACHE_DIR`` > ``$XDG_CACHE_HOME/cloak`` (never the package dir)."""
    if flag:
        return Path(flag).expanduser()
    if os.environ.get("CLOAK_CACHE_DIR"):
        return Path(os.environ["CLOAK_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "cloak"
