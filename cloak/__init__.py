"""cloak: protect photos against unauthorized personalization of diffusion models, and measure it.

The Python API mirrors the CLI verbs: keyword arguments are the command's flags (``--eps-unit`` is
``eps_unit``, ``-o key=value`` is ``options={"key": value}``), and each call returns the verb's report,
readable as attributes or as a dict (``report.summary`` or ``report["summary"]``)::

    import cloak
    cloak.protect("photos/", "protected/", method="aspl", model="tiny-sd")
    report = cloak.score("generated/", ref="photos/", metrics=["psnr", "ssim"])
    report["summary"]["metrics"]["psnr"]["mean"]

Errors are :class:`cloak.errors.CloakError` subclasses, whose ``exit_code`` is the CLI's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloak import _lazy_imports

if TYPE_CHECKING:
    from collections.abc import Callable
    from os import PathLike

    from cloak.eval import EvalRun
    from cloak.io.report import Report

__version__ = "0.1.0"

# diffusers' model-family packages import only the model files a run uses (cloak/_lazy_imports.py).
_lazy_imports.install()


def _split(run_kwargs: dict[str, Any], common_values: dict[str, Any]):
    """Common flags (and any flag another version adds to ``Common``) for the shared set-up; the rest,
    verb-specific, for the verb's run function."""
    from dataclasses import fields

    from cloak._verb import Common

    names = {f.name for f in fields(Common)}
    values = {k: v for k, v in common_values.items() if v is not None or k in ("config", "cache_dir")}
    values.update({k: v for k, v in run_kwargs.items() if k in names})
    if values.get("options") is None:
        values.pop("options", None)
    rest = {k: v for k, v in run_kwargs.items() if k not in names}
    return Common(**values), rest


def _known(verb: str, api_fn: Callable, run_fn: Callable, rest: dict[str, Any]) -> dict[str, Any]:
    """``rest`` if the verb's run function takes every key, else a UsageError naming the first it does not.

    The run functions end in ``**kwargs`` that only feed a ``Common`` built when none is passed; the API
    always passes one, so a misspelt keyword (``num_image=1``) used to be dropped without a word and the
    run went on with the default (or, for score, died in a TypeError)."""
    import inspect
    from dataclasses import fields

    from cloak._verb import Common
    from cloak.errors import UnknownArgumentError
    from cloak.registry import suggest

    def named(fn) -> set[str]:
        return {n for n, p in inspect.signature(fn).parameters.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    accepted = named(run_fn) - {"common"}
    for key in rest:
        if key not in accepted:
            valid = sorted((named(api_fn) | accepted | {f.name for f in fields(Common)}) - {"common", "argv"})
            raise UnknownArgumentError(f"cloak.{verb}(): unknown argument {key!r}{suggest(key, valid)}")
    return rest


def _str(path) -> str | None:
    return None if path is None else str(path)


def protect(input_dir: str | PathLike, output_dir: str | PathLike, *, method: str | None = None,
            ref: str | PathLike | None = None, eps: float | str | None = None, eps_unit: str | None = None,
            force_budget: bool = False, fit: str | None = None, steps: int | None = None,
            target_image: str | PathLike | None = None, class_dir: str | PathLike | None = None,
            model: str | None = None,
            tiny: bool = False, effort: float | None = None, resolution: int | None = None, seed: int | None = None,
            device: str | None = None, dtype: str | None = None, options: dict[str, Any] | None = None,
            force: bool = False, resume: bool = False, keep_going: bool = False, keep_metadata: bool = False,
            compat: bool = False, config: str | None = None, cache_dir: str | None = None,
            on_item: Callable[[dict], None] | None = None, **kwargs: Any) -> Report:
    """Perturb the images of ``input_dir`` into PNGs in ``output_dir`` (``cloak protect``).

    Args:
        method: protection method (``cloak methods protect``); ``ref``: clean photos of the same person for
            surrogate methods; ``eps``: the ℓ∞ budget with its unit (``"8/255"``, ``"8lv"``) or a number
            with ``eps_unit`` (m11, 01, 255); ``force_budget``: allow a budget above 32/255; ``fit``: keep
            (default: each photo at its own size), crop (the papers' centre square) or resize;
            ``steps``: the method's main iteration count; ``target_image``: for targeted methods;
            ``class_dir``: your own class images for the surrogate's prior preservation.
        model, tiny, effort, resolution, seed, device, dtype: as the CLI flags (``tiny=True``: the
            built-in random stand-in, seconds, protects nothing).
        options: method options, as ``-o key=value`` (``cloak methods show METHOD``).
        force, resume, keep_going, keep_metadata, compat, config, cache_dir: as the CLI flags.
        on_item: called with each item's record as it finishes (the CLI's ``--jsonl``).
        **kwargs: any further flag of this version, passed through.

    Returns the report (also written to ``output_dir/report.json``).
    """
    from cloak.protect.run import run_protect

    common, rest = _split(kwargs, dict(method=method, model=model, tiny=tiny, effort=effort, resolution=resolution,
                                       seed=seed, device=device, dtype=dtype, options=options, force=force,
                                       resume=resume, keep_going=keep_going, keep_metadata=keep_metadata,
                                       compat=compat, config=config, cache_dir=cache_dir, on_item=on_item))
    if class_dir is not None:
        common.class_dir = _str(class_dir)
    _known("protect", protect, run_protect, rest)
    return run_protect(input_dir, output_dir, ref=_str(ref), eps=eps, eps_unit=eps_unit, force_budget=force_budget,
                       fit=fit, steps=steps, target_image=_str(target_image), common=common, **rest)


def immunize(input_dir: str | PathLike, output_dir: str | PathLike, *, method: str | None = None,
             safe: str | PathLike | None = None, checkpoint_every: int | None = None, model: str | None = None,
             tiny: bool = False, effort: float | None = None, resolution: int | None = None,
             seed: int | None = None, device: str | None = None, dtype: str | None = None,
             options: dict[str, Any] | None = None, force: bool = False, resume: bool = False,
             compat: bool = False, config: str | None = None, cache_dir: str | None = None,
             **kwargs: Any) -> Report:
    """Write an immunized copy of the base model to ``output_dir`` (``cloak immunize``).

    Args:
        method: immunization method (default apdm); ``safe``: the paired safe image set;
            ``checkpoint_every``: outer iterations between checkpoints (``resume=True`` continues).
        model, tiny, effort, resolution, seed, device, dtype, options, force, resume, compat, config,
            cache_dir: as the CLI flags (``options`` is ``-o key=value`` as a dict).
        **kwargs: any further flag of this version, passed through.

    Returns the report (also in ``output_dir/report.json``).
    """
    from cloak.immunize.run import run_immunize

    common, rest = _split(kwargs, dict(method=method, model=model, tiny=tiny, effort=effort, resolution=resolution,
                                       seed=seed, device=device, dtype=dtype, options=options, force=force,
                                       resume=resume, compat=compat, config=config, cache_dir=cache_dir))
    _known("immunize", immunize, run_immunize, rest)
    return run_immunize(input_dir, output_dir, safe=_str(safe), checkpoint_every=checkpoint_every, common=common,
                        **rest)


def purify(input_dir: str | PathLike, output_dir: str | PathLike, *, method: str | None = None,
           model: str | None = None, tiny: bool = False, effort: float | None = None, resolution: int | None = None,
           seed: int | None = None, device: str | None = None, dtype: str | None = None,
           options: dict[str, Any] | None = None, force: bool = False, resume: bool = False,
           keep_going: bool = False, keep_metadata: bool = False, compat: bool = False, config: str | None = None,
           cache_dir: str | None = None, on_item: Callable[[dict], None] | None = None, **kwargs: Any) -> Report:
    """Purify the (possibly protected) images of ``input_dir`` into ``output_dir`` (``cloak purify``).

    Args:
        method: purification method (``cloak methods purify``); ``options``: ``-o key=value`` as a dict.
        model, tiny, effort, resolution, seed, device, dtype, force, resume, keep_going, keep_metadata,
            compat, config, cache_dir: as the CLI flags.
        on_item: called with each item's record as it finishes.
        **kwargs: any further flag of this version, passed through.

    Returns the report (also in ``output_dir/report.json``).
    """
    from cloak.purify.run import run_purify

    common, rest = _split(kwargs, dict(method=method, model=model, tiny=tiny, effort=effort, resolution=resolution,
                                       seed=seed, device=device, dtype=dtype, options=options, force=force,
                                       resume=resume, keep_going=keep_going, keep_metadata=keep_metadata,
                                       compat=compat, config=config, cache_dir=cache_dir, on_item=on_item))
    _known("purify", purify, run_purify, rest)
    return run_purify(input_dir, output_dir, common=common, **rest)


def attack(input_dir: str | PathLike, output_dir: str | PathLike, *, method: str | None = None,
           ref: str | PathLike | None = None, prompts: list[str] | None = None, num_images: int | None = None,
           sample_steps: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
           sampler: str | None = None, save_model: str | PathLike | None = None, steps: int | None = None,
           model: str | None = None, tiny: bool = False, effort: float | None = None,
           resolution: int | None = None, seed: int | None = None, device: str | None = None,
           dtype: str | None = None, options: dict[str, Any] | None = None, force: bool = False,
           resume: bool = False, keep_going: bool = False, compat: bool = False, config: str | None = None,
           cache_dir: str | None = None, on_item: Callable[[dict], None] | None = None, **kwargs: Any) -> Report:
    """Personalize a model on ``input_dir`` and generate images into ``output_dir/gen`` (``cloak attack``).

    Args:
        method: personalization method (default dreambooth); ``ref``: clean photos to report identity
            similarity against; ``prompts``, ``num_images``, ``sample_steps``, ``guidance``,
            ``negative_prompt``, ``sampler``: sampling; ``save_model``: keep the fine-tuned model there;
            ``steps``: training steps.
        model, tiny, effort, resolution, seed, device, dtype, options, force, resume, keep_going, compat,
            config, cache_dir: as the CLI flags (``options`` is ``-o key=value`` as a dict).
        on_item: called with each item's record as it finishes.
        **kwargs: any further flag of this version, passed through.

    Returns the report (also in ``output_dir/report.json``).
    """
    from cloak.attack.run import run_attack

    common, rest = _split(kwargs, dict(method=method, model=model, tiny=tiny, effort=effort, resolution=resolution,
                                       seed=seed, device=device, dtype=dtype, options=options, force=force,
                                       resume=resume, keep_going=keep_going, compat=compat, config=config,
                                       cache_dir=cache_dir, on_item=on_item))
    _known("attack", attack, run_attack, rest)
    return run_attack(input_dir, output_dir, ref=_str(ref), prompts=prompts, num_images=num_images,
                      sample_steps=sample_steps, guidance=guidance, negative_prompt=negative_prompt, sampler=sampler,
                      save_model=_str(save_model), steps=steps, common=common, **rest)


def score(generated_dir: str | PathLike, *, ref: str | PathLike | None = None, metrics: list[str] | None = None,
          fail_if: list[str] | None = None, report_path: str | PathLike | None = None,
          per_subdir: bool | None = None, sheet: str | PathLike | None = None, undefined: str | None = None,
          align: str | None = None, tiny: bool = False,
          seed: int | None = None, device: str | None = None, options: dict[str, Any] | None = None,
          keep_going: bool = False, config: str | None = None, cache_dir: str | None = None,
          on_item: Callable[[dict], None] | None = None, **kwargs: Any) -> Report:
    """Score the images of ``generated_dir`` against the clean ``ref`` photos (``cloak score``).

    Args:
        ref: clean reference photos; ``metrics``: metric names (default fdfr, ism); ``fail_if``: gate
            expressions (a true one raises :class:`cloak.errors.GateFailed`, carrying the report);
            ``report_path``: also write the JSON report there; ``per_subdir``: score each subfolder
            against the same-named one of ``ref``; ``sheet``: write a contact sheet PNG there;
            ``undefined``: ``"pass"`` lets a gate on an undefined value pass (default: it fails);
            ``align``: ``"resize"`` or ``"crop"`` to compare pairs of different sizes (default: an error).
        tiny, seed, device, keep_going, config, cache_dir: as the CLI flags; ``options``: metric options,
            ``{"ism.backend": "dlib"}`` as ``-o ism.backend=dlib``.
        on_item: called with each image's record as it is scored.
        **kwargs: any further flag of this version, passed through.

    Returns the report; ``report["summary"]["metrics"]`` holds each metric's mean, std and n.
    """
    from cloak.score.runner import score_run

    common, rest = _split(kwargs, dict(tiny=tiny, seed=seed, device=device, options=options, keep_going=keep_going,
                                       config=config, cache_dir=cache_dir, on_item=on_item))
    _known("score", score, score_run, rest)
    return score_run(generated_dir, ref=_str(ref), metrics=metrics, fail_if=fail_if, report_path=_str(report_path),
                     per_subdir=per_subdir, sheet=_str(sheet), undefined=undefined, align=align, common=common,
                     **rest)


def eval(plan: str | PathLike, output_dir: str | PathLike, *, executor: str = "local", dry_run: bool = False,
         force: bool = False, ray_address: str | None = None, workers: int | None = None,
         on_cell: Callable[[dict], None] | None = None) -> EvalRun:
    """Run an evaluation PLAN (a TOML file: protections × purifications × attacks × identities, each cell
    scored) into ``output_dir`` (``cloak eval``). Finished steps are kept, so calling it again resumes;
    ``force=True`` redoes everything, ``dry_run=True`` only plans (``run.plan_text``).

    Args:
        executor: ``local`` (one process, models kept warm) or ``ray``; ``ray_address``, ``workers``: for ray.
        on_cell: called with each cell's record as it finishes.

    Returns the :class:`cloak.eval.EvalRun` (``run.cells``, ``run.files``); raises
    :class:`cloak.errors.PartialFailure` (exit 5) after writing the results if a cell failed.
    """
    from cloak.eval import run_eval

    return run_eval(plan, output_dir, executor=executor, dry_run=dry_run, force=force, on_cell=on_cell,
                    ray_address=ray_address, workers=workers)


# The verbs' functions share their names with the subpackages that hold each verb's methods
# (``cloak.protect`` the function, ``cloak/protect/`` the package). Importing a subpackage sets it as an
# attribute of this package, which would replace the function after its first call. The package's
# module class keeps the functions: the subpackages stay reachable through ``sys.modules`` and
# ``import cloak.protect.aspl`` / ``from cloak.protect import PROTECT`` as usual.
import sys as _sys
import types as _types

_API = ("protect", "immunize", "purify", "attack", "score", "eval")


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        if name in _API and isinstance(value, _types.ModuleType):
            return  # a subpackage being bound by the import system: keep the function
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
