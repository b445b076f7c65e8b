"""Shared flag definitions (Annotated aliases), defined once for every verb."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

_RUN = "Run"
_OUT = "Output"

MethodOpt = Annotated[Optional[str], typer.Option("--method", "-m", help="Method name (`cloak methods VERB` lists them).",
                                                  rich_help_panel=_RUN)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Model id from `cloak models list`, or a local "
                                                 "diffusers directory.", rich_help_panel=_RUN)]
TinyOpt = Annotated[bool, typer.Option("--tiny", help="Use the built-in random stand-in for every model role "
                                       "(demos, smoke tests: protects and measures nothing).", rich_help_panel=_RUN)]
EffortOpt = Annotated[Optional[float], typer.Option("--effort", help="Scale every iteration count of the method "
                                                    "(each at least 1): 0.1 for a preview.", rich_help_panel=_RUN)]
ResolutionOpt = Annotated[Optional[int], typer.Option("--resolution", help="Working resolution in pixels (default: "
                                                      "the model's own, 512 for SD).", rich_help_panel=_RUN)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default 0).", rich_help_panel=_RUN)]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps "
                                                  "[env CLOAK_DEVICE].", rich_help_panel=_RUN)]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="Weight dtype: fp32 (default), bf16, fp16.",
                                                 rich_help_panel=_RUN)]
MemoryOpt = Annotated[Optional[str], typer.Option(
    "--memory", help="Memory tier of the fine-tuning methods: default, or low (gradient checkpointing, one image "
    "per PGD pass, a LoRA surrogate where the method has one).", metavar="default|low", rich_help_panel=_RUN)]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option", "-o", metavar="KEY=VALUE",
                                                        help="Method option (repeatable); `cloak methods show "
                                                        "NAME` lists them.", rich_help_panel=_RUN)]
CompatOpt = Annotated[bool, typer.Option("--compat", help="Reproduce the released code's quirks ([Q] in the "
                                         "spec) instead of the corrected default.", rich_help_panel=_RUN)]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="cloak.toml to read (default: ./cloak.toml, "
                                                  "then $XDG_CONFIG_HOME/cloak/cloak.toml).", rich_help_panel=_RUN)]
CacheOpt = Annotated[Optional[str], typer.Option("--cache-dir", help="Model cache [env CLOAK_CACHE_DIR].",
                                                 rich_help_panel=_RUN)]
ClassDirOpt = Annotated[Optional[Path], typer.Option(
    "--class-dir", help="Your own class images for prior preservation (as DreamBooth users do), instead of "
    "generating them; the first N by name are used, N = the method's class_images scaled by --effort.",
    rich_help_panel=_RUN)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the full report as JSON on stdout.",
                                       rich_help_panel=_OUT)]
JsonlOpt = Annotated[bool, typer.Option("--jsonl", help="Print one JSON record per item on stdout as it finishes.",
                                        rich_help_panel=_OUT)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors (no progress, summary or "
                                        "warnings); stdout is unchanged.",
                                        rich_help_panel=_OUT)]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output on stderr (-vv: debug).",
                                         rich_help_panel=_OUT)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.", rich_help_panel=_OUT)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Skip items whose output already exists.",
                                         rich_help_panel=_OUT)]
KeepGoingOpt = Annotated[bool, typer.Option("--keep-going", help="Skip unreadable inputs and failed items; exit 5 "
                                            "if any failed.", rich_help_panel=_OUT)]
KeepMetadataOpt = Annotated[bool, typer.Option("--keep-metadata", help="Copy each source's EXIF (GPS included; "
                                              "orientation reset), ICC profile, dpi and PNG text to its output. "
                                              "Default: outputs carry no metadata.", rich_help_panel=_OUT)]
