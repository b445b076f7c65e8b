"""cloak: protect photos against unauthorized personalization of diffusion models, and measure it.

The Python API mirrors the CLI verbs; each call returns the verb's report::

    import cloak
    cloak.protect("photos/", "protected/", method="aspl", model="tiny-sd")
    cloak.score("generated/", ref="photos/", metrics=["psnr", "ssim"])
"""

__version__ = "0.1.0"


def protect(input_dir, output_dir, **kwargs):
    """Perturb the images of ``input_dir`` into ``output_dir`` (see ``cloak protect --help``)."""
    from cloak.api import run_protect

    return run_protect(input_dir, output_dir, **kwargs)


def immunize(input_dir, output_dir, **kwargs):
    """Write an immunized model directory (see ``cloak immunize --help``)."""
    from cloak.immunize.run import run_immunize

    return run_immunize(input_dir, output_dir, **kwargs)


def purify(input_dir, output_dir, **kwargs):
    """Purify (possibly protected) images (see ``cloak purify --help``)."""
    from cloak.api import run_purify

    return run_purify(input_dir, output_dir, **kwargs)


def attack(input_dir, output_dir, **kwargs):
    """Personalize a model on ``input_dir`` and generate images (see ``cloak attack --help``)."""
    from cloak.api import run_attack

    return run_attack(input_dir, output_dir, **kwargs)


def score(generated_dir, **kwargs):
    """Score generated images against a clean reference set (see ``cloak score --help``)."""
    from cloak.api import run_score

    return run_score(generated_dir, **kwargs)
