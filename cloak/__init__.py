"""cloak: protect photos against unauthorized personalization of diffusion models, and measure it.

The Python API mirrors the CLI verbs; each call returns the verb's report::

    import cloak
    cloak.protect("photos/", "protected/", method="aspl", model="tiny-sd")
    cloak.score("generated/", ref="photos/", metrics=["psnr", "ssim"])
"""

__version__ = "0.1.0"


def protect(input_dir, output_dir, **kwargs):
    """Perturb the images of ``input_dir`` into ``output_dir`` (see ``cloak protect --help``)."""
    from cloak.protect.run import run_protect

    return run_protect(input_dir, output_dir, **kwargs)


def immunize(input_dir, output_dir, **kwargs):
    """Write an immunized model directory (see ``cloak immunize --help``)."""
    from cloak.immunize.run import run_immunize

    return run_immunize(input_dir, output_dir, **kwargs)


def purify(input_dir, output_dir, **kwargs):
    """Purify (possibly protected) images (see ``cloak purify --help``)."""
    from cloak.purify.run import run_purify

    return run_purify(input_dir, output_dir, **kwargs)


def attack(input_dir, output_dir, **kwargs):
    """Personalize a model on ``input_dir`` and generate images (see ``cloak attack --help``)."""
    from cloak.attack.run import run_attack

    return run_attack(input_dir, output_dir, **kwargs)


def score(generated_dir, **kwargs):
    """Score generated images against a clean reference set (see ``cloak score --help``)."""
    from cloak.api import run_score

    return run_score(generated_dir, **kwargs)


# The verbs' functions share their names with the subpackages that hold each verb's methods
# (``cloak.protect`` the function, ``cloak/protect/`` the package). Importing a subpackage sets it as an
# attribute of this package, which would replace the function after its first call. The package's
# module class keeps the functions: the subpackages stay reachable through ``sys.modules`` and
# ``import cloak.protect.aspl`` / ``from cloak.protect import PROTECT`` as usual.
import sys as _sys
import types as _types

_API = ("protect", "immunize", "purify", "attack", "score")


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        if name in _API and isinstance(value, _types.ModuleType):
            return  # a subpackage being bound by the import system: keep the function
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
