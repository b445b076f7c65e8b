"""What a run imports: diffusers' model families load on demand (cloak/_lazy_imports.py).

Load-independent: the tests look at which modules are in ``sys.modules``, never at a clock.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cloak import _lazy_imports

ROOT = Path(__file__).resolve().parent.parent

# Files of diffusers' eager model-family __init__s that SD never uses; each pulled a heavy chain before.
UNUSED = ["diffusers.models.transformers.ace_step_transformer",  # → diffusers.hooks → peft.auto
          "diffusers.models.transformers.auraflow_transformer_2d",
          "diffusers.models.transformers.transformer_flux",
          "diffusers.models.autoencoders.autoencoder_asym_kl",
          "diffusers.models.autoencoders.autoencoder_rae",
          "diffusers.models.unets.unet_motion_model",
          "diffusers.models.unets.unet_stable_cascade",
          "diffusers.hooks.layerwise_casting",
          "diffusers.hooks.faster_cache"]
PACKAGES = list(_lazy_imports.LAZY_PACKAGES)

# A run's model imports, through the real loader: Models.sd (from_pretrained of every SD component) and
# the class-image pipeline with the fast sampler. Prints what is loaded, then every name of the four
# packages with the object it resolves to (the lazy process resolves them only after the check).
_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import cloak
    from cloak.models.handle import Models
    from cloak.diffusion.sampling import build_pipeline
    import diffusers

    import gc
    collections_before = [g["collections"] for g in gc.get_stats()]
    sd = Models(cache_dir=Path(sys.argv[1]), tiny=True).sd("tiny-sd")
    collections = [after - before for after, before in zip([g["collections"] for g in gc.get_stats()],
                                                          collections_before)]
    pipe = build_pipeline(sd, sampler="dpm")
    frozen, tracked = gc.get_freeze_count(), len(gc.get_objects())
    stats_ran = "scipy.stats._stats_py" in sys.modules
    assert type(sd.unet).__name__ == "UNet2DConditionModel" and type(sd.vae).__name__ == "AutoencoderKL"
    loaded = sorted(m for m in sys.modules if m.startswith(("diffusers.", "peft", "transformers.", "scipy.")))
    n_modules = len(sys.modules)
    packages = json.loads(sys.argv[2])
    lazy = {p: bool(getattr(sys.modules[p], "__cloak_lazy__", False)) for p in packages}
    names = {}
    for p in packages:
        mod = sys.modules[p]
        public = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for n in public:
            value = getattr(mod, n)
            if isinstance(value, type):
                names[p + ":" + n] = value.__module__ + "." + value.__qualname__
    # scipy.stats where a scheduler needs it (beta sigmas): the same numbers as a plain import gives
    from diffusers import DPMSolverMultistepScheduler
    beta = DPMSolverMultistepScheduler(use_beta_sigmas=True)
    beta.set_timesteps(12)
    beta_sigmas = [float(x) for x in beta.sigmas]
    print(json.dumps({"loaded": loaded, "n_modules": n_modules, "lazy": lazy, "names": names,
                      "frozen": frozen, "tracked": tracked, "collections": collections, "stats_ran": stats_ran,
                      "beta_sigmas": beta_sigmas}))
""")


def _probe(cache: Path, eager: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CLOAK_EAGER_IMPORTS": "1" if eager else "0"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(cache), json.dumps(PACKAGES)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sd_run_imports_no_unused_diffusers_families_and_names_resolve_as_before(shared_cache):
    lazy = _probe(shared_cache, eager=False)
    if not all(lazy["lazy"].values()):
        pytest.skip(f"diffusers {__import__('diffusers').__version__} is not a checked version: plain imports")
    loaded = set(lazy["loaded"])
    assert not loaded & set(UNUSED), sorted(loaded & set(UNUSED))
    assert {"diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
            "diffusers.models.transformers.transformer_2d"} <= loaded
    # The control: the plain import loads them (so the assertion above can fail), and every class name of
    # the four packages resolves to the same class either way.
    eager = _probe(shared_cache, eager=True)
    assert not any(eager["lazy"].values())
    assert set(UNUSED) <= set(eager["loaded"])
    assert eager["n_modules"] - lazy["n_modules"] >= len(UNUSED)
    assert lazy["names"] == eager["names"] and len(lazy["names"]) > 100


def test_model_load_freezes_the_import_objects_once_so_full_collections_skip_them(shared_cache):
    """A full gc.collect() walks only what is tracked: after Models.sd the objects the imports made are in
    the permanent generation (once), the loaded model and everything after it are not."""
    row = _probe(shared_cache, eager=False)
    assert row["frozen"] > 100_000 and row["frozen"] > 3 * row["tracked"], row["frozen"]


def test_model_load_imports_run_without_collections_walking_them(shared_cache):
    """Models.sd imports diffusers/transformers (~3,000 modules) with the collector paused, and freezes
    them before it resumes: no full collection during the load and few young ones (the weights' loading).
    Measured here: 37 young, 3 middle, 0 full; before, the same load ran ~360 young, ~30 middle and 1–2 full
    collections over the objects the imports made."""
    young, middle, full = _probe(shared_cache, eager=False)["collections"]
    assert full == 0 and middle <= 10 and young <= 120, (young, middle, full)


def test_scipy_stats_runs_only_when_read_and_then_gives_the_same_numbers(shared_cache):
    """diffusers' schedulers ``import scipy.stats`` (~1.3 s) for beta sigmas only: on a run's imports its
    code does not run; the first read runs it, and the sigmas equal those of the plain import."""
    lazy = _probe(shared_cache, eager=False)
    eager = _probe(shared_cache, eager=True)
    assert not lazy["stats_ran"] and "scipy.stats._stats_py" not in lazy["loaded"]
    assert eager["stats_ran"]  # the control: the plain import runs it, so the assertion above can fail
    assert lazy["beta_sigmas"] == eager["beta_sigmas"] and len(lazy["beta_sigmas"]) == 13


def _package(root: Path, name: str, init: str) -> None:
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(init)
    (pkg / "light.py").write_text("class Light:\n    pass\n")
    # Importing heavy records itself: the test sees whether the package's __init__ ran eagerly.
    (pkg / "heavy.py").write_text("import sys\nsys.modules[__name__.rsplit('.', 1)[0]].imported_heavy = True\n"
                                  "class Heavy:\n    pass\n")


def _import_fresh(name: str):
    import importlib

    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    return importlib.import_module(name)


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "lazyroot"  # laid out as diffusers: the guard lives outside the packages
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "guard.py").write_text("def is_torch_available():\n    return True\n")
    monkeypatch.setattr(_lazy_imports, "LAZY_PACKAGES", ("lazyroot.ok", "lazyroot.odd"))
    monkeypatch.setattr(_lazy_imports, "_diffusers_version_checked", lambda: True)
    monkeypatch.delenv(_lazy_imports.ENV_EAGER, raising=False)
    _lazy_imports.install()
    shape = textwrap.dedent("""
        '''doc'''
        from ..guard import is_torch_available

        if is_torch_available():
            from .light import Light
            from .heavy import Heavy as HeavyAlias
        """)
    _package(root, "ok", shape)
    _package(root, "odd", shape + "\nEXTRA = 1\n")
    yield root
    for key in [k for k in sys.modules if k == "lazyroot" or k.startswith("lazyroot.")]:
        del sys.modules[key]


def test_lazy_package_imports_a_submodule_only_when_its_name_is_asked_for(fake_packages):
    pkg = _import_fresh("lazyroot.ok")
    assert pkg.__cloak_lazy__ and "lazyroot.ok.heavy" not in sys.modules
    assert "imported_heavy" not in vars(pkg)
    assert pkg.__path__ == [str(fake_packages / "ok")]
    assert Path(pkg.__file__) == fake_packages / "ok" / "__init__.py"
    from lazyroot.ok import Light  # noqa: F401 (the from-import path)

    assert "lazyroot.ok.light" in sys.modules and "lazyroot.ok.heavy" not in sys.modules
    assert {"Light", "HeavyAlias", "is_torch_available"} <= set(dir(pkg))
    assert pkg.HeavyAlias.__name__ == "Heavy" and pkg.imported_heavy
    assert pkg.heavy is sys.modules["lazyroot.ok.heavy"]  # a submodule read as an attribute
    with pytest.raises(AttributeError):
        pkg.Missing  # noqa: B018
    with pytest.raises(ImportError):
        from lazyroot.ok import Missing  # noqa: F401


def test_an_unchecked_init_shape_or_the_opt_out_gets_the_plain_import(fake_packages, monkeypatch):
    odd = _import_fresh("lazyroot.odd")
    assert not getattr(odd, "__cloak_lazy__", False) and odd.imported_heavy and odd.EXTRA == 1
    monkeypatch.setenv(_lazy_imports.ENV_EAGER, "1")
    ok = _import_fresh("lazyroot.ok")
    assert not getattr(ok, "__cloak_lazy__", False) and ok.imported_heavy


def test_exported_names_reads_the_init_without_running_it(tmp_path):
    init = tmp_path / "__init__.py"
    init.write_text("from .a import X, Y as Z\nfrom ..b import W\n")
    assert _lazy_imports.exported_names(init, "p.q") == {"X": "p.q.a:X", "Z": "p.q.a:Y", "W": "p.b:W"}
    for odd in ("from .a import *\n", "import os\n", "from a import X\n", "if True:\n    from .a import X\n",
                "X = 1\n"):
        init.write_text(odd)
        assert _lazy_imports.exported_names(init, "p.q") is None, odd


@pytest.fixture
def fresh_stages(monkeypatch):
    monkeypatch.setattr(_lazy_imports, "_frozen_stages", set())
    was = gc.isenabled()
    yield
    gc.enable() if was else gc.disable()


def test_library_imports_pauses_the_collector_freezes_once_per_stage_and_leaves_it_as_found(fresh_stages,
                                                                                             monkeypatch):
    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(gc.isenabled()))
    gc.enable()
    with _lazy_imports.library_imports("a"):
        assert not gc.isenabled()
        with _lazy_imports.library_imports("a"):  # nested: resumes at the outermost only
            pass
        assert not gc.isenabled()
    assert gc.isenabled() and frozen == [False]  # frozen once, while still paused
    with _lazy_imports.library_imports("a"):  # the same stage again (the API called twice): no second freeze
        pass
    with pytest.raises(ValueError), _lazy_imports.library_imports("b"):
        raise ValueError  # an import that fails: the collector is back on, nothing frozen for it
    assert gc.isenabled() and frozen == [False]
    gc.disable()  # a caller's own gc.disable() stands
    with _lazy_imports.library_imports("c"):
        pass
    assert not gc.isenabled() and frozen == [False, False]


def test_a_module_loaded_on_access_runs_at_its_first_read_and_before_its_submodules(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = tmp_path / "onaccess"
    (pkg / "stats").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stats" / "__init__.py").write_text("import sys\nsys.modules['onaccess'].ran = True\nVALUE = 7\n")
    (pkg / "stats" / "sub.py").write_text("from . import VALUE\nTWICE = 2 * VALUE\n")
    (pkg / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.setattr(_lazy_imports, "LOADED_ON_ACCESS", ("onaccess.stats", "onaccess.broken"))
    monkeypatch.delenv(_lazy_imports.ENV_EAGER, raising=False)
    _lazy_imports.install()
    try:
        import onaccess.stats
        import onaccess.stats  # noqa: F811 - the second import reads __spec__ only: still not run

        assert not hasattr(sys.modules["onaccess"], "ran")
        assert sys.modules["onaccess.stats"].__spec__.name == "onaccess.stats"
        assert onaccess.stats.VALUE == 7 and sys.modules["onaccess"].ran
        assert type(onaccess.stats) is type(sys) and onaccess.stats.__loader__ is onaccess.stats.__spec__.loader
        del sys.modules["onaccess.stats"], sys.modules["onaccess"].ran
        from onaccess.stats.sub import TWICE  # a submodule: its package's code runs first

        assert TWICE == 14 and sys.modules["onaccess"].ran
        import onaccess.broken

        with pytest.raises(RuntimeError, match="on purpose"):
            onaccess.broken.anything  # noqa: B018
        assert "onaccess.broken" not in sys.modules  # as a failed plain import
    finally:
        for key in [k for k in sys.modules if k == "onaccess" or k.startswith("onaccess.")]:
            del sys.modules[key]
