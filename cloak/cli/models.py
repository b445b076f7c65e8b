"""``cloak models``: the shared model cache (list, pull, path, verify, rm)."""

from __future__ import annotations

import shutil
import sys
from typing import Annotated, Optional

import typer

from cloak.cli import _output
from cloak.cli._options import CacheOpt, JsonOpt

app = typer.Typer(no_args_is_help=True,
                  help="Manage the shared model cache. Only `pull` touches the network.\n\n"
                       "Pins: an entry is `pinned` (hub commit id and every file's published sha256), `partial` "
                       "(some pins; the rest recorded at the first pull), `prefix` (torchvision's 8-digit hash "
                       "prefix) or `tofu` (nothing published: trust on first use, recorded in lock.json). A file "
                       "that differs from its pin is refused and deleted.\n\n"
                       "Mirrors: HF_ENDPOINT=URL sends hub downloads to a hub mirror; CLOAK_MIRROR=URL fetches "
                       "release files from URL/<host>/<path> (e.g. URL/github.com/sczhou/CodeFormer/releases/"
                       "download/v0.1.0/codeformer.pth). An interrupted pull resumes when run again (what "
                       "arrived is kept).",
                  epilog="Examples:\n\n  cloak models list\n\n  cloak models pull sd21-base retinaface-r50 "
                         "arcface-irse50\n\n  CLOAK_MIRROR=https://artifacts.example/cloak HF_ENDPOINT="
                         "https://hf-mirror.example cloak models pull codeformer sd15\n\n"
                         "  cloak models verify sd21-base\n\n  cloak models path tiny-sd")


def _cache(cache_dir: str | None):
    from cloak.config import cache_dir as resolve

    return resolve(cache_dir)


@app.command("list")
def list_models(cache_dir: CacheOpt = None, as_json: JsonOpt = False) -> None:
    """List known model ids, how pulls are checked (trust), licence, cache status and size on disk.

    Piped: TSV rows id, status, kind, trust, licence, size."""
    from cloak.models.cache import dir_size, human_size, is_complete, model_dir
    from cloak.models.catalog import CATALOG, trust

    cache = _cache(cache_dir)
    rows = []
    for spec in CATALOG.values():
        if spec.source.startswith("pip:"):
            present = _packaged(spec.id)
            size = None  # lives in its package, not in the cache
        else:
            target = model_dir(cache, spec.id)
            present = is_complete(target)
            size = dir_size(target) if target.is_dir() else None  # an interrupted pull takes space too
        trusted = trust(spec)
        status = "built-in" if spec.builtin else ("cached" if present else "missing")
        if spec.source.startswith("pip:"):
            status = "packaged" if present else "package missing"
        rows.append({"id": spec.id, "kind": spec.kind, "status": status, "licence": spec.licence,
                     "non_commercial": spec.non_commercial, "source": spec.source, "revision": spec.revision,
                     "trust": trusted, "checksum": _CHECKSUM_WORDS.get(trusted, "n/a"), "pin_source": spec.pin_source,
                     "stand_in": spec.stand_in, "description": spec.description, "notes": spec.notes,
                     "size_bytes": size})
    if as_json:
        _output.data_json(rows)
        return
    if not sys.stdout.isatty():  # piped: one TSV row per model, nothing else on stdout
        for r in rows:
            _output.data(f"{r['id']}\t{r['status']}\t{r['kind']}\t{r['trust']}\t{r['licence']}\t"
                         f"{human_size(r['size_bytes'])}")
        _output.note(f"cache: {cache}")
        return
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    def licence(r) -> Text:
        # Some catalog licences already say NON-COMMERCIAL (CodeFormer's); say it once, in red either way.
        if not r["non_commercial"]:
            return Text(r["licence"])
        if "NON-COMMERCIAL" in r["licence"]:
            return Text(r["licence"], style="bold red")
        return Text(r["licence"]) + Text(" (NON-COMMERCIAL)", style="bold red")

    console = Console(highlight=False, markup=False)
    if console.width < _TABLE_MIN_WIDTH:
        # A six-column table on a narrow terminal squeezes the ids to "sd21-sh…", and the id is what the
        # user has to type next; one block per model keeps every id whole at any width.
        for r in rows:
            console.print(Text(r["id"], style="bold") + Text(f"  {r['status']}, {r['trust']}, "
                                                            f"{human_size(r['size_bytes'])}"))
            console.print(Padding(licence(r), (0, 0, 0, 2)))  # padded, so wrapped lines keep the indent
            console.print(Padding(Text(r["description"]), (0, 0, 0, 2)))
    else:
        # On a terminal the same rows as a table, instead of the TSV (not as well).
        t = Table(show_edge=False)
        t.add_column("id", no_wrap=True, min_width=max(len(r["id"]) for r in rows))
        for col in ("status", "trust", "size", "licence", "description"):
            t.add_column(col)
        for r in rows:
            t.add_row(Text(r["id"]), Text(r["status"]), Text(r["trust"]), Text(human_size(r["size_bytes"])),
                      licence(r), Text(r["description"]))
        console.print(t)
    total = sum(r["size_bytes"] or 0 for r in rows)
    _output.note(f"cache: {cache} ({human_size(total)} in models)")


# Below this many columns the table no longer fits the longest id next to five other columns.
_TABLE_MIN_WIDTH = 110

_CHECKSUM_WORDS = {"pinned": "pinned", "partial": "partly pinned, the rest recorded at pull",
                   "prefix": "sha256 prefix from the file name, full digest recorded at pull",
                   "tofu": "recorded at pull (trust on first use)"}


def _packaged(model_id: str) -> bool:
    from cloak.errors import CloakError
    from cloak.models.packaged import package_dir

    try:
        package_dir(model_id)
        return True
    except CloakError:
        return False


@app.command("pull")
def pull(
    ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Model ids to download.")],
    cache_dir: CacheOpt = None,
) -> None:
    """Download models into the cache (checksums verified where pinned, recorded otherwise)."""
    from cloak.models.cache import pull as do_pull

    from cloak.models.cache import spec_or_error

    cache = _cache(cache_dir)
    for model_id in ids:
        spec = spec_or_error(model_id)
        if spec.non_commercial:
            # Said before the download starts, so nobody fetches weights they may not use without knowing.
            _output.warning(f"{model_id} is under {spec.licence}: not for commercial use")
        path = do_pull(cache, model_id, progress=_output.note)
        _output.data(str(path))


@app.command("path")
def path(model_id: Annotated[str, typer.Argument(metavar="ID")], cache_dir: CacheOpt = None) -> None:
    """Print the local directory of a cached (or built-in) model; exit 4 if it is missing."""
    from cloak.models.cache import resolve_path

    _output.data(str(resolve_path(_cache(cache_dir), model_id)))


@app.command("verify")
def verify(
    ids: Annotated[Optional[list[str]], typer.Argument(metavar="[ID...]", help="Default: every cached model.")] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Re-hash cached files against the pinned and recorded digests; exit 1 on a mismatch, 4 if not cached."""
    from cloak.errors import CloakError, ModelUnavailableError
    from cloak.models.cache import is_complete, model_dir, spec_or_error
    from cloak.models.cache import verify as do_verify
    from cloak.models.catalog import CATALOG

    cache = _cache(cache_dir)
    targets = ids or [i for i in CATALOG if is_complete(model_dir(cache, i))]
    if not targets:
        # Silence and exit 0 read as "all verified"; say that there was nothing to check.
        _output.note(f"nothing to verify: no model is cached in {cache / 'models'}")
        return
    bad, missing = 0, []
    for model_id in targets:
        spec = spec_or_error(model_id)
        if not is_complete(model_dir(cache, model_id)) and not spec.builtin:
            # Never pulled (or an interrupted pull): nothing to verify, which is not a failed check.
            _output.data(f"{model_id}\tnot in the cache")
            missing.append(model_id)
            continue
        problems = do_verify(cache, model_id) if is_complete(model_dir(cache, model_id)) else []
        _output.data(f"{model_id}\t{'ok' if not problems else 'FAILED'}")
        for p in problems:
            _output.note(f"  {model_id}: {p}")
        bad += bool(problems)
    if bad:
        raise CloakError(f"{bad} model(s) failed verification")
    if missing:
        raise ModelUnavailableError(f"not in the cache: {', '.join(missing)} (looked in {cache / 'models'})",
                                    hint=f"`cloak models pull {' '.join(missing)}` on a machine with network access")


@app.command("rm")
def rm(
    ids: Annotated[list[str], typer.Argument(metavar="ID...")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    cache_dir: CacheOpt = None,
) -> None:
    """Remove models from the cache (an id that is not there is reported, and nothing is removed)."""
    from cloak.errors import UsageError
    from cloak.models.cache import dir_size, human_size, is_complete, model_dir, spec_or_error

    cache = _cache(cache_dir)
    for model_id in ids:
        spec_or_error(model_id)
        target = model_dir(cache, model_id)
        if not target.is_dir():
            _output.note(f"{model_id}: not in the cache ({target}); nothing removed")
            continue
        what = "" if is_complete(target) else "incomplete download "
        size = human_size(dir_size(target))
        if dry_run:
            _output.data(f"would remove {what}{target} ({size})")
            continue
        if not yes:
            import sys

            if not sys.stdin.isatty():
                raise UsageError(f"refusing to remove {target} without --yes (stdin is not a terminal)")
            if not typer.confirm(f"remove {what}{target} ({size})?"):
                continue
        shutil.rmtree(target)
        _output.data(f"removed {what}{target} ({size})")
