"""Weights that ship inside an installed Python package (catalog ``source="pip:DIST"``).

dlib's face models (``face-recognition-models``), MTCNN (``facenet-pytorch``) and BRISQUE's SVR
(``brisque``) are real weights that install offline from PyPI. They are never downloaded by cloak and
have no random stand-in: ``--tiny`` uses them as they are, so CI without a hub still measures
something real. ``[models] ID = "/path"`` in cloak.toml points an id at another copy of the files.

The package is located with ``importlib.util.find_spec``, which does not execute the package (the
``brisque`` package, for one, imports libsvm and requests at import time; only its data files are read).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cloak.errors import ModelUnavailableError
from cloak.models.catalog import get_spec


def package_dir(model_id: str) -> Path:
    """The directory inside the installed package that holds ``model_id``'s files."""
    spec = get_spec(model_id)
    if spec is None or not spec.source.startswith("pip:"):
        raise ValueError(f"{model_id} is not a packaged model")
    module = spec.extra["module"]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        extra = spec.extra.get("extra")
        raise ModelUnavailableError(
            f"model {model_id} ships in the Python package {spec.source[4:]!r}, which is not installed",
            hint=(f"pip install 'cloak[{extra}]'" if extra else f"pip install {spec.source[4:]}")
            + f", or set [models].{model_id} = \"/path/to/files\" in cloak.toml")
    path = Path(list(found.submodule_search_locations)[0]) / spec.extra.get("subdir", "")
    missing = [f.path for f in spec.files if not (path / f.path).is_file()]
    if missing:
        raise ModelUnavailableError(f"model {model_id}: {', '.join(missing)} missing in {path}",
                                    hint=f"reinstall {spec.source[4:]}")
    return path
