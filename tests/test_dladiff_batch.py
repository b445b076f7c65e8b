"""DLADiff layer 1's PGD loops in pgd_batch chunks (issue 16 §4): each chunk takes its own rows of the per-image
draws and its own clean images (the attention target), so the chunked run is the one-batch run up to UNet
rounding."""

from __future__ import annotations

import pytest
import torch

from _groups_helper import image_set, make_method


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """This file's tests run on one intra-op thread (conftest's ``one_thread``)."""


def _flat(pixels) -> torch.Tensor:
    return pixels.flatten() if isinstance(pixels, torch.Tensor) else torch.cat([p.flatten() for p in pixels])


def test_layer_ft_pgd_batch_gives_the_whole_set_step(shared_cache):
    """Steps 1 (attention + L_dn against the static surrogate) and 3 (L_dn against the dynamic one) in chunks:
    the objectives agree with the one-batch run's and the protected pixels too, but for the few whose gradient
    sign flips at float rounding."""
    runs, batch = {}, 2
    for size in (0, batch):  # 3 images: chunks of rows 0–1 and 2
        method = make_method("dladiff", shared_cache, {"layers": "ft", "pgd_batch": size, "epochs": 1,
                                                       "attention_steps": 2, "pgd_steps": 2})
        result = method(image_set([(64, 64)] * 3))
        runs[size] = (_flat(result.pixels), result.summary["layer_ft"])
    (whole, a), (chunked, b) = runs[0], runs[batch]
    assert a["pgd_batch"] == 0 and b["pgd_batch"] == batch
    for key in ("final_attention_objective", "final_pgd_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-4), key
    # D is a small MSE of two nearby maps (~6e-5 on tiny-sd): a few flipped pixels move it more, relatively
    assert a["final_attention_term"] == pytest.approx(b["final_attention_term"], rel=1e-2)
    same = (whole == chunked).float().mean().item()
    assert same > 0.95, same
    alpha = make_method("dladiff", shared_cache, {"layers": "ft"}).opts.alpha_m11
    assert (whole - chunked).abs().max() <= 2 * 2 * alpha + 1e-6  # 1 epoch × 2 PGD loops × 2 steps


def test_pgd_batch_is_validated_and_set_by_memory_low():
    from pydantic import ValidationError

    from cloak.diffusion.memory import tier_options
    from cloak.protect.dladiff import DLADiffOptions

    with pytest.raises(ValidationError):
        DLADiffOptions(pgd_batch=-1)
    assert tier_options("low", DLADiffOptions) == {"pgd_batch": 1}


def test_chunks_fail_without_their_own_rows(shared_cache, monkeypatch):
    """The chunks really are cut: a chunk that got the whole bucket's draw instead of its own rows breaks the
    UNet's batch (the check that the chunked path ran)."""
    from cloak.diffusion.loss import Draw

    monkeypatch.setattr(Draw, "rows", lambda self, rows: self)
    method = make_method("dladiff", shared_cache, {"layers": "ft", "pgd_batch": 2, "epochs": 1,
                                                   "attention_steps": 1, "pgd_steps": 0})
    with pytest.raises(RuntimeError):  # the UNet gets 2 images and 3 timesteps
        method(image_set([(64, 64)] * 3))


def test_memory_low_sets_pgd_batch_in_the_report(tmp_path, image_dir, cli):
    """Through the CLI: --memory low gives DLADiff pgd_batch=1 (recorded with its source, and in layer 1's
    summary), a bad value is a usage error."""
    import json

    out = tmp_path / "out"
    small = ["-o", "layers=ft", "-o", "class_images=0", "-o", "epochs=1", "-o", "static_steps=1",
             "-o", "attention_steps=1", "-o", "surrogate_steps=1", "-o", "pgd_steps=1"]
    r = cli("protect", str(image_dir), str(out), "--tiny", "--method", "dladiff", "--memory", "low", *small)
    assert r.exit_code == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["pgd_batch"] == {"value": 1, "source": "--memory low"}
    assert report["summary"]["layer_ft"]["pgd_batch"] == 1
    bad = cli("protect", str(image_dir), str(tmp_path / "bad"), "--tiny", "--method", "dladiff", *small,
              "-o", "pgd_batch=-1")
    assert bad.exit_code == 2 and "pgd_batch" in bad.stderr
