"""ASPL works on tiny-sd: after the same DreamBooth attack, the attacker's denoising loss on the
clean subject photos is higher when it trained on ASPL-protected photos than on the clean ones.

tiny-sd has random weights and a random VAE, so the defaults (lr 5e-7, η 0.05) would move nothing in
the few steps a test can afford. The test raises the surrogate's and the attacker's learning rate
to 1e-4 and the budget to 0.1 (m11) so the effect is well above seed noise (margins seen: ≈0.01–0.03
on losses ≈0.73, across seeds); everything else is the released algorithm.
"""

from __future__ import annotations

import json

import pytest
from conftest import write_images

ATTACK = ["--tiny", "-q", "--json", "-o", "class_images=0", "-o", "lr=1e-4", "--steps", "60", "--num-images", "0"]


@pytest.mark.parametrize("seed", [0])
def test_aspl_raises_attackers_loss_on_clean_photos(cli, tmp_path, seed):
    clean = write_images(tmp_path / "clean", n=3, seed=0)
    r = cli("protect", "--tiny", "-q", "--seed", seed, "-o", "class_images=0", "-o", "iterations=10",
            "-o", "lr=1e-4", "--eps", "0.1", "--eps-unit", "m11", clean, tmp_path / "protected")
    assert r.exit_code == 0, r.stderr
    losses = {}
    for name, train in (("clean", clean), ("protected", tmp_path / "protected")):
        r = cli("attack", *ATTACK, "--seed", seed, "--ref", clean, train, tmp_path / f"attack-{name}")
        assert r.exit_code == 0, r.stderr
        losses[name] = json.loads(r.stdout)["summary"]["ref_denoising_loss"]
    assert losses["protected"] > losses["clean"] + 0.002, losses
