"""Load diffusers' model families on demand, so ``import UNet2DConditionModel`` does not import all of them.

diffusers' top level is lazy, but four of its subpackages are not: ``diffusers.models.transformers``,
``diffusers.models.autoencoders``, ``diffusers.models.unets`` and ``diffusers.hooks`` import every file
in their ``__init__``. SD's UNet imports ``unets.unet_2d_blocks``, which imports
``transformers.dual_transformer_2d``, which runs ``transformers/__init__``: ~80 transformer families,
~40 autoencoders, every UNet and hook. For SD that is ~145 modules nobody uses (diffusers 0.42.1:
3,886 modules instead of 4,036 for the imports of ``Models.sd``; ``tests/test_import_budget.py``).
The heavy libraries those files pull in (peft, transformers' modeling code, torch._dynamo) are imported
anyway by the files SD does need (``loaders.lora_base``, ``CLIPTextModel``; ``diffusers.utils`` itself
imports torch._dynamo, and so does transformers' ``masking_utils``), so the saving is those files' own
import time, not the libraries'. scipy.stats, which the schedulers bind with a plain ``import`` and read
only for beta sigmas, is created but runs its code only when first read (``LOADED_ON_ACCESS``).
:func:`library_imports` pauses the cyclic collector while the libraries are imported and freezes what they
made.

:func:`install` adds a ``sys.meta_path`` finder for exactly those four packages. It finds each package
with the ordinary path finder (same ``__path__``, same ``__file__``) and, instead of running its
``__init__``, gives it a module ``__getattr__`` that imports ``.submodule`` and returns the name the first
time a name is asked for. ``from diffusers.models.transformers import X``, ``import
diffusers.models.unets.unet_2d_condition``, ``getattr(diffusers, "AutoencoderKL")``,
``from_pretrained`` and pipelines behave as before; only the files nobody asks for are not imported.

It applies only where this is provably the same namespace: the ``__init__`` must consist of nothing
but relative ``from .module import Name`` statements, optionally under ``if is_torch_available():``
(read with ``ast``, not executed), and diffusers' version must be one this was checked on. Anything
else, and ``CLOAK_EAGER_IMPORTS=1`` (also for scipy.stats), gets the plain import. A package already
imported is left alone.
"""

from __future__ import annotations

import ast
import gc
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

LAZY_PACKAGES = ("diffusers.models.transformers", "diffusers.models.autoencoders", "diffusers.models.unets",
                 "diffusers.hooks")
# Modules that the libraries bind with a plain ``import x.y`` and read only when a feature that needs them
# runs: their code runs on the first attribute read (_RunOnAccessLoader). diffusers' schedulers
# ``import scipy.stats`` for ``use_beta_sigmas`` only, and scipy.stats is ~1.3 s of a run's imports.
LOADED_ON_ACCESS = ("scipy.stats",)
# diffusers releases whose three __init__ files have the checked shape (pyproject's floor to the newest
# one read); a newer minor gets the plain import until it is checked and added here.
CHECKED_DIFFUSERS = ((0, 30), (0, 42))
_GUARDS = ("is_torch_available",)  # the only conditions the __init__ files may test
ENV_EAGER = "CLOAK_EAGER_IMPORTS"


def _diffusers_version_checked() -> bool:
    diffusers = sys.modules.get("diffusers")
    version = getattr(diffusers, "__version__", "")
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return CHECKED_DIFFUSERS[0] <= (major, minor) <= CHECKED_DIFFUSERS[1]


def _absolute(package: str, module: str | None, level: int) -> str:
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{module}" if module else base


def exported_names(init_file: Path, package: str) -> dict[str, str] | None:
    """``{name: absolute module}`` that ``package``'s ``__init__`` would bind, or None if it does anything
    else than relative from-imports (possibly under ``if is_torch_available():``).

    Only the relative from-imports are read here; a guard's value is asked from the module it was
    imported from, so the names bound are those the real ``__init__`` binds on this machine.
    """
    try:
        tree = ast.parse(init_file.read_text(encoding="utf-8"), str(init_file))
    except (OSError, SyntaxError, ValueError):
        return None
    names: dict[str, str] = {}

    def visit(body: list[ast.stmt]) -> bool:
        for node in body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value,
                                                                                                  str):
                continue  # a docstring
            if isinstance(node, ast.ImportFrom):
                if node.level < 1 or any(alias.name == "*" for alias in node.names):
                    return False
                source = _absolute(package, node.module, node.level)
                for alias in node.names:
                    names[alias.asname or alias.name] = f"{source}:{alias.name}"
                continue
            if isinstance(node, ast.If):
                test = node.test
                if not (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id in _GUARDS
                        and not test.args and not test.keywords and test.func.id in names):
                    return False
                module, attr = names[test.func.id].split(":")
                if module == package or module.startswith(package + "."):
                    return False  # asking it would import the package being found
                try:
                    taken = bool(getattr(importlib.import_module(module), attr)())
                except Exception:  # noqa: BLE001 - any surprise means: not the checked shape
                    return False
                if not visit(node.body if taken else node.orelse):
                    return False
                continue
            return False
        return True

    return names if visit(tree.body) else None


class _LazyPackageLoader(importlib.abc.Loader):
    def __init__(self, names: dict[str, str]):
        self.names = names

    def create_module(self, spec):
        return None  # the default module object, with the spec's __path__/__file__

    def exec_module(self, module: types.ModuleType) -> None:
        names = self.names
        package = module.__name__

        def __getattr__(attr: str):
            source = names.get(attr)
            if source is None:
                if attr.startswith("__"):
                    raise AttributeError(f"module {package!r} has no attribute {attr!r}")
                try:  # a submodule read as an attribute, as the eager __init__ would have bound it
                    return importlib.import_module(f"{package}.{attr}")
                except ModuleNotFoundError as exc:
                    if exc.name != f"{package}.{attr}":
                        raise
                    raise AttributeError(f"module {package!r} has no attribute {attr!r}") from None
            module_name, name = source.split(":")
            value = getattr(importlib.import_module(module_name), name)
            setattr(module, attr, value)
            return value

        def __dir__():
            return sorted(set(module.__dict__) | set(names))

        module.__getattr__ = __getattr__
        module.__dir__ = __dir__
        module.__all__ = [n for n in names if not n.startswith("_")]
        module.__cloak_lazy__ = True  # so a test (and a curious user) can tell


class _PendingModule(types.ModuleType):
    """A module whose code has not run yet: the first attribute read runs it, then reads the attribute.

    ``__spec__``, ``__name__`` and ``__class__`` are read without running it: the import system reads
    ``__spec__`` on every later ``import x.y`` of a module already in ``sys.modules`` (Python 3.11), which
    is why ``importlib.util.LazyLoader`` would run the code at the second ``import scipy.stats``. Any other
    name (``__path__`` for a submodule's import, ``__dict__``, ``__file__``, every public name) runs it
    first, so the module's own ``__init__`` still runs before any of its submodules, as in a plain import.
    """

    def __getattribute__(self, attr):
        if attr in ("__spec__", "__name__", "__class__"):
            return object.__getattribute__(self, attr)
        spec = object.__getattribute__(self, "__spec__")
        object.__setattr__(self, "__class__", types.ModuleType)  # before running: the code reads itself
        spec.loader = spec.cloak_loader  # the real loader, as a plain import leaves it
        del spec.cloak_loader
        self.__loader__ = spec.loader
        try:
            spec.loader.exec_module(self)
        except BaseException:
            if sys.modules.get(spec.name) is self:  # as a failed plain import: not left half-run
                del sys.modules[spec.name]
            raise
        return getattr(self, attr)


class _RunOnAccessLoader(importlib.abc.Loader):
    """Create the module as the real loader would, defer running its code to the first attribute read."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__.cloak_loader = self.loader
        module.__class__ = _PendingModule


class _LazyPackageFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in LAZY_PACKAGES and fullname not in LOADED_ON_ACCESS:
            return None
        if os.environ.get(ENV_EAGER, "") not in ("", "0"):
            return None
        if fullname in LOADED_ON_ACCESS:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or not hasattr(spec.loader, "exec_module"):
                return None
            spec.loader = _RunOnAccessLoader(spec.loader)
            return spec
        if not _diffusers_version_checked():
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not spec.origin or not spec.submodule_search_locations:
            return None
        names = exported_names(Path(spec.origin), fullname)
        if names is None:
            return None  # not the checked shape: the plain import
        spec.loader = _LazyPackageLoader(names)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _LazyPackageFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LazyPackageFinder())


_frozen_stages: set[str] = set()


@contextmanager
def library_imports(stage: str):
    """Import the model libraries in the block with CPython's cyclic garbage collector paused; then, the
    first time per ``stage`` in this process, move every object alive into the permanent generation
    (``gc.freeze``, CPython's documented API for long-lived start-up objects) before switching it back on.

    Importing torch, diffusers and transformers makes ~470k objects (modules, classes, functions) that
    live as long as the process. While they are made, the collector would run ~1,250 young and ~8 full
    collections that walk them again and again and free almost nothing, and every later full collection
    would walk them once more: about a second of CPU or more on a 2-core machine, for nothing. Frozen
    before the collector is back on, not even the first young collection walks them. Objects made later
    (models, trainers, tensors) are collected as before. The cyclic garbage the imports leave (~9 MB for
    a protect run) is frozen with them: a one-time, bounded cost. The collector is switched back on only
    if it was on (a caller's own ``gc.disable()`` stands; nested blocks resume at the outermost).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if stage not in _frozen_stages:
            _frozen_stages.add(stage)
            gc.freeze()
    finally:
        if was_enabled:
            gc.enable()
