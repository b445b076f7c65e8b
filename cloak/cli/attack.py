"""``cloak attack``: personalize a model on images, as an adversary would, then generate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cloak.cli import _options as O  # noqa: N812
from cloak.cli._run import common, execute

HELP = """Personalize a model on the images of INPUT, as an adversary would, and generate from it.

Writes OUTPUT/gen/<prompt>/<seed>.png and OUTPUT/report.json. Score the result with
`cloak score OUTPUT/gen --ref CLEAN`. With --ref, the report also gives the fine-tuned model's
denoising loss on the clean photos (fixed draws): higher means the protection worked.
Training writes a checkpoint to OUTPUT/.checkpoint every few hundred steps; --resume continues from it.
Zero-shot methods (ipadapter) generate once per reference image: OUTPUT/gen/<image>/<prompt>/<seed>.png.
--preset NAME applies a paper's attack settings (method, base model, training and sampling options):
antidreambooth, apdm, diffshortcut; --method, --model, the flags and -o override it, and the report
records the preset and what was overridden. A model directory written by `cloak immunize` names its
base model: class images for prior preservation come from that base, as in APDM's evaluation.
Training reads square working copies (short side resized to the model's resolution, centre crop), as
an attacker's DreamBooth script does; photos of any size and aspect can be given.
"""

EPILOG = """Examples:

  cloak attack --method dreambooth protected/ attacked/ --ref photos/

  cloak attack --prompt 'a photo of sks person' --num-images 4 protected/ attacked/

  cloak attack --model ./immunized-model photos/ attacked/ --save-model ./personalized

  cloak attack --preset apdm --model ./immunized-model photos/ attacked/      (APDM's evaluation)

  cloak attack --preset antidreambooth protected/ attacked/ --ref photos/    (Anti-DreamBooth's)

  cloak purify --method diffshortcut protected/ purified/ && cloak attack --method diffshortcut purified/ attacked/
"""


def register(app: typer.Typer) -> None:
    @app.command("attack", help=HELP, epilog=EPILOG, no_args_is_help=True)
    def attack(
        input_dir: Annotated[Path, typer.Argument(metavar="INPUT", help="Training images (protected or not); - reads "
                                                  "image paths from stdin, one per line.")],
        output_dir: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Directory for generated images.")],
        method: O.MethodOpt = None,
        ref: Annotated[Optional[Path], typer.Option("--ref", help="Clean photos of the subject: report the "
                                                    "attacker's denoising loss on them.")] = None,
        prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="Prompt to sample (repeatable).")] = None,
        num_images: Annotated[Optional[int], typer.Option("--num-images", help="Images per prompt "
                                                          "(seeds 0..N-1).")] = None,
        sample_steps: Annotated[Optional[int], typer.Option("--sample-steps", help="Sampling steps.")] = None,
        guidance: Annotated[Optional[float], typer.Option("--guidance", help="Guidance scale.")] = None,
        negative_prompt: Annotated[Optional[str], typer.Option("--negative-prompt", help="Negative prompt.")] = None,
        sampler: Annotated[Optional[str], typer.Option("--sampler", help="default, ddim, pndm, dpm, euler, "
                                                       "ddpm.")] = None,
        steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps.")] = None,
        preset: Annotated[Optional[str], typer.Option("--preset", metavar="antidreambooth|apdm|diffshortcut",
                                                      help="A paper's attack settings; explicit flags and -o "
                                                           "override them.")] = None,
        save_model: Annotated[Optional[Path], typer.Option("--save-model", help="Keep the fine-tuned model "
                                                           "(a diffusers directory; lora: the adapter file).")] = None,
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
        class_dir: O.ClassDirOpt = None,
        as_json: O.JsonOpt = False,
        jsonl: O.JsonlOpt = False,
        quiet: O.QuietOpt = False,
        verbose: O.VerboseOpt = 0,
        force: O.ForceOpt = False,
        resume: O.ResumeOpt = False,
        keep_going: O.KeepGoingOpt = False,
    ) -> None:
        from cloak.attack.run import run_attack

        c = common(method=method, model=model, tiny=tiny, effort=effort, resolution=resolution, seed=seed,
                   device=device, dtype=dtype, option=option, force=force, resume=resume, keep_going=keep_going,
                   compat=compat, config=config, cache_dir=cache_dir, class_dir=class_dir, quiet=quiet,
                   verbose=verbose, jsonl=jsonl)
        execute(c, lambda: run_attack(input_dir, output_dir, ref=str(ref) if ref else None, prompts=prompt or None,
                                      num_images=num_images, sample_steps=sample_steps, guidance=guidance,
                                      negative_prompt=negative_prompt, sampler=sampler, steps=steps, preset=preset,
                                      save_model=str(save_model) if save_model else None, common=c),
                output_dir / "gen", as_json=as_json, jsonl=jsonl, quiet=quiet, run_dir=output_dir)
