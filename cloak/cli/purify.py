"""``cloak purify``: try to remove protective perturbations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloak.cli import _options as O  # noqa: N812
from cloak.cli._run import common, execute

HELP = """Purify the (possibly protected) images of INPUT into OUTPUT, keeping names and sizes.

Purifiers are how protections are tested: a protection is only worth what survives them. The
report gives each image's PSNR and ℓ∞ distance to its input.
"""

EPILOG = """Examples:

  cloak purify --method jpeg -o quality=75 protected/ purified/

  cloak purify --method gaussian protected/ purified/

  cloak protect photos/ prot/ && cloak purify prot/ pur/ && cloak attack pur/ att/ && cloak score att/gen --ref photos/
"""


def register(app: typer.Typer) -> None:
    @app.command("purify", help=HELP, epilog=EPILOG, no_args_is_help=True)
    def purify(
        input_dir: Annotated[Path, typer.Argument(metavar="INPUT", help="Images to purify; - reads image paths from "
                                                  "stdin, one per line.")],
        output_dir: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Directory for purified PNGs.")],
        method: O.MethodOpt = None,
        model: O.ModelOpt = None,
        tiny: O.TinyOpt = False,
        effort: O.EffortOpt = None,
        resolution: O.ResolutionOpt = None,
        seed: O.SeedOpt = None,
        device: O.DeviceOpt = None,
        dtype: O.DtypeOpt = None,
        option: O.OptionOpt = None,
        compat: O.CompatOpt = False,
        config: O.ConfigOpt = None,
        cache_dir: O.CacheOpt = None,
        as_json: O.JsonOpt = False,
        jsonl: O.JsonlOpt = False,
        quiet: O.QuietOpt = False,
        verbose: O.VerboseOpt = 0,
        force: O.ForceOpt = False,
        resume: O.ResumeOpt = False,
        keep_going: O.KeepGoingOpt = False,
        keep_metadata: O.KeepMetadataOpt = False,
    ) -> None:
        from cloak.purify.run import run_purify

        c = common(method=method, model=model, tiny=tiny, effort=effort, resolution=resolution, seed=seed,
                   device=device, dtype=dtype, option=option, force=force, resume=resume, keep_going=keep_going,
                   keep_metadata=keep_metadata,
                   compat=compat, config=config, cache_dir=cache_dir, quiet=quiet, verbose=verbose, jsonl=jsonl)
        execute(c, lambda: run_purify(input_dir, output_dir, common=c), output_dir, as_json=as_json, jsonl=jsonl,
                quiet=quiet)
