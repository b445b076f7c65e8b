"""``cloak config``: where configuration comes from."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cloak.cli import _output
from cloak.cli._options import ConfigOpt, JsonOpt

app = typer.Typer(no_args_is_help=True, help="Show the configuration cloak would use, with each value's source.")


@app.command("show")
def show(
    verb: Annotated[Optional[str], typer.Option("--verb", help="Also show that verb's section.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the file found, the cache directory, and every configured value with its source."""
    import os

    from cloak.config import ENV_VARS, cache_dir, config_search_path, load_config

    cfg = load_config(config)
    env = {k: {"value": os.environ[v], "source": f"env {v}"} for k, v in ENV_VARS.items() if os.environ.get(v)}
    out = {"config_file": str(cfg.path) if cfg.path else None,
           "searched": [str(p) for p in config_search_path(config)],
           "cache_dir": str(cache_dir(cfg.defaults.get("cache_dir"))), "environment": env,
           "values": {section: {k: {"value": v, "source": "config"} for k, v in values.items()}
                      if isinstance(values, dict) else values
                      for section, values in cfg.data.items() if verb is None or section in (verb, "defaults",
                                                                                                   "models")}}
    if as_json:
        _output.data_json(out)
        return
    _output.data(f"config_file\t{out['config_file'] or '(none)'}")
    _output.data(f"cache_dir\t{out['cache_dir']}")
    for k, v in env.items():
        _output.data(f"{k}\t{v['value']}\t({v['source']})")
    for section, values in out["values"].items():
        for k, v in values.items():
            _output.data(f"{section}.{k}\t{v['value'] if isinstance(v, dict) else v}\t(config)")
