"""``cloak protect``: add protective perturbations to images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cloak.cli import _options as O  # noqa: N812
from cloak.cli._run import common, execute

HELP = """Add protective perturbations to the images of INPUT and write them as PNGs to OUTPUT.

The perturbation stays inside an ℓ∞ budget (--eps, with its unit) after 8-bit rounding. Methods that
fine-tune a surrogate (aspl, fsmg, simac, metacloak, dladiff) learn best from a separate set of clean
photos of the same person: pass it with --ref.

[bold]Budgets carry their unit[/bold] (a bare --eps 8 is refused: 8 in [-1,1] would be the whole range):
--eps 8/255 or --eps 8lv (8-bit levels), or a number with its unit: --eps 0.03 --eps-unit 01.
Units: m11 = [-1,1] pixel space (Anti-DreamBooth's 0.05), 01 = [0,1] space, 255 = 8-bit levels.
The same holds for -o eps=... and eps in cloak.toml. A budget under 1/255 (the PNG would not change)
is refused; above 32/255 needs --force-budget. An output identical to its input is a failed item.

[bold]Default budgets[/bold] (eps; `cloak methods show NAME` for every option):

  aspl, aspl-lora, fsmg,     6.375/255 = 0.025 (01) = 0.05 (m11)
  cap, dladiff, caat

  simac                      8/255 = 0.03137 (01) = 0.06275 (m11)

  photoguard                 7.65/255 = 0.03 (01) = 0.06 (m11)

  metacloak                  11/255 = 0.04314 (01) = 0.08627 (m11)

  pid                        12.75/255 = 0.05 (01) = 0.1 (m11)

  advdm, mist, sds-plus,     16/255 = 0.06275 (01) = 0.1255 (m11)
  sds-minus, sds-t

  dladiff eps_zs (layer 2)   8/255 = 0.03137 (01) = 0.06275 (m11)

[bold]Photo size[/bold] (--fit): keep (default) returns each photo at its own pixel size and orientation:
the method works on a copy whose short side is the model's resolution (--resolution), padded by
reflection to the latent grid (64 px for SD), and the perturbation is resampled (bicubic) back to the
photo and held within --eps there. crop returns the centre square at the model's resolution (what the
papers evaluate: use it to reproduce their tables); resize squashes the photo to a square working copy
and stretches the perturbation back. Photos of different shapes are processed in shape buckets.

Mid-run snapshots (-o save_every=N: aspl, simac, fsmg, cap) go to OUTPUT/.steps/, a hidden folder the
other verbs skip when they read OUTPUT. Large sets: -o pgd_batch=N bounds the PGD step's memory.
"""

EPILOG = """Examples:

  cloak protect --method aspl --ref clean_A/ photos/ protected/

  cloak protect --method photoguard photo.jpg protected/   (full-size photo in, full-size PNG out)

  cloak protect --method aspl --fit crop photos/ protected/  (the papers' 512² centre crops)

  cloak protect --method aspl --eps 8/255 photos/ protected/         (also: --eps 8lv, --eps 0.03 --eps-unit 01)

  find shoot/ -name '*.jpg' | cloak protect --method aspl - protected/     (paths on stdin)

  cloak protect --tiny --effort 0.1 photos/ /tmp/preview      (seconds; random model, protects nothing)

  cloak methods show aspl                                     (every option, default and unit)
"""


def register(app: typer.Typer) -> None:
    @app.command("protect", help=HELP, epilog=EPILOG, no_args_is_help=True)
    def protect(
        input_dir: Annotated[Path, typer.Argument(metavar="INPUT", help="Directory of images to protect; - reads "
                                                  "image paths from stdin, one per line.")],
        output_dir: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Directory for the protected PNGs.")],
        method: O.MethodOpt = None,
        ref: Annotated[Optional[Path], typer.Option("--ref", help="Clean photos of the same identity (set A) for "
                                                    "the surrogate; default: the input images.")] = None,
        eps: Annotated[Optional[str], typer.Option("--eps", metavar="BUDGET", help="ℓ∞ budget with its unit: "
                                                   "8/255, 8lv, or a number with --eps-unit (0.03 --eps-unit "
                                                   "01).")] = None,
        eps_unit: Annotated[Optional[str], typer.Option("--eps-unit", help="Unit of a plain --eps number (and of "
                                                        "the step): m11, 01 or 255.")] = None,
        force_budget: Annotated[bool, typer.Option("--force-budget", help="Allow a budget above 32/255 (plainly "
                                                   "visible).")] = False,
        steps: Annotated[Optional[int], typer.Option("--steps", help="The method's main iteration count.")] = None,
        target_image: Annotated[Optional[Path], typer.Option("--target-image", help="Target image for targeted "
                                                             "methods (photoguard, mist, T-ASPL).")] = None,
        fit: Annotated[Optional[str], typer.Option(
            "--fit", help="keep: output at the photo's own size (default); crop: the centre square at the model's "
                          "resolution, as the papers evaluate; resize: squash to a square, stretch back.",
            metavar="keep|crop|resize")] = None,
        model: O.ModelOpt = None,
        tiny: O.TinyOpt = False,
        effort: O.EffortOpt = None,
        resolution: O.ResolutionOpt = None,
        seed: O.SeedOpt = None,
        device: O.DeviceOpt = None,
        dtype: O.DtypeOpt = None,
        memory: O.MemoryOpt = None,
        option: O.OptionOpt = None,
        compat: O.CompatOpt = False,
        config: O.ConfigOpt = None,
        cache_dir: O.CacheOpt = None,
        class_dir: O.ClassDirOpt = None,
        as_json: O.JsonOpt = False,
        jsonl: O.JsonlOpt = False,
        quiet: O.QuietOpt = False,
        verbose: O.VerboseOpt = 0,
        force: O.ForceOpt = False,
        resume: O.ResumeOpt = False,
        keep_going: O.KeepGoingOpt = False,
        keep_metadata: O.KeepMetadataOpt = False,
    ) -> None:
        from cloak.protect.run import run_protect

        c = common(method=method, model=model, tiny=tiny, effort=effort, resolution=resolution, seed=seed,
                   device=device, dtype=dtype, memory=memory, option=option, force=force, resume=resume, keep_going=keep_going,
                   keep_metadata=keep_metadata,
                   compat=compat, config=config, cache_dir=cache_dir, class_dir=class_dir, quiet=quiet,
                   verbose=verbose, jsonl=jsonl)
        execute(c, lambda: run_protect(input_dir, output_dir, ref=str(ref) if ref else None, eps=eps,
                                       eps_unit=eps_unit, force_budget=force_budget, steps=steps, fit=fit, common=c,
                                       target_image=str(target_image) if target_image else None),
                output_dir, as_json=as_json, jsonl=jsonl, quiet=quiet)
