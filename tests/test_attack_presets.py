"""``cloak attack --preset``: the papers' attack settings by name; class images from an immunized model's base.

APDM's evaluation (KU-VGI/APDM run.sh, gen_arguments.py get_arguments_db) personalizes SD 1.5 with the
immunized UNet: UNet only, lr 5e-6, 800 steps, batch 1, 200 class images sampled by the *base* pipeline —
not Anti-DreamBooth's lr 5e-7 with the text encoder trained, which ``cloak attack --model immunized/`` ran.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import write_images

from cloak.api import Common, run_attack
from cloak.attack.presets import PRESETS
from cloak.errors import UsageError

# Seconds on tiny-sd: what each test overrides in every preset (and so also checks that explicit values win).
TINY = {"steps": 1, "class_images": 2, "class_image_steps": 2, "num_images": 0}
IMMUNIZE_FAST = {"class_images": 2, "class_image_steps": 2, "safe_image_steps": 2, "iterations": 1, "inner_steps": 1}


def test_preset_apdm_sets_the_papers_settings_and_explicit_values_win(tmp_path):
    images = write_images(tmp_path / "in", n=2)
    rep = run_attack(images, tmp_path / "out", preset="apdm", steps=2,
                     common=Common(tiny=True, options={k: v for k, v in TINY.items() if k != "steps"}, argv=[]))
    o = rep.options
    assert o["lr"] == {"value": 5e-6, "source": "preset apdm"}
    assert o["train_text_encoder"] == {"value": False, "source": "preset apdm"}
    assert o["batch_size"]["value"] == 1 and o["sampler"]["value"] == "pndm" and o["sample_steps"]["value"] == 20
    assert o["prompts"]["value"] == ["a photo of sks person", "a portrait of sks person"]
    assert o["steps"] == {"value": 2, "source": "flag"} and o["class_images"] == {"value": 2, "source": "-o"}
    assert rep.method == "dreambooth" and rep.params["method"]["source"] == "preset apdm"
    assert rep.params["model"] == {"value": "sd15", "source": "preset apdm"}
    assert rep.params["preset"]["value"] == "apdm"
    p = rep.summary["preset"]
    assert p["name"] == "apdm" and "KU-VGI/APDM" in p["source"] and p["options"]["steps"] == 800
    assert p["overridden"] == sorted(TINY)
    assert rep.summary["train_steps"] == 2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_for_its_method(name):
    """Each preset's options validate against its method (a typo in a preset is caught here, not by a user)."""
    from cloak.attack import ATTACK
    from cloak.attack.presets import preset_layer
    from cloak.methods import build_options

    preset = PRESETS[name]
    cls = ATTACK.get(preset.method)
    opts, record = build_options(cls.Options, [("preset", preset_layer(preset, cls.Options, preset.method))],
                                 preset.method)
    assert all(record[k]["source"] == "preset" for k in preset.options)
    assert opts.class_images == 200 and opts.prior_weight == 1.0
    assert (opts.lr, opts.train_text_encoder, opts.steps) == {"apdm": (5e-6, False, 800),
                                                              "antidreambooth": (5e-7, True, 1000),
                                                              "diffshortcut": (5e-7, True, 1000)}[name]


def test_preset_errors_are_usage_errors(tmp_path):
    images = write_images(tmp_path / "in", n=1)
    with pytest.raises(UsageError, match="did you mean 'apdm'"):
        run_attack(images, tmp_path / "a", preset="apdn", common=Common(tiny=True, argv=[]))
    # An explicit --method wins over the preset's; options it does not have are refused, never dropped.
    with pytest.raises(UsageError, match="ipadapter does not have"):
        run_attack(images, tmp_path / "b", preset="apdm", common=Common(tiny=True, method="ipadapter", argv=[]))


@pytest.fixture(scope="module")
def immunized(tmp_path_factory):
    """A model directory written by `cloak immunize` (tiny-sd, seconds), with what the CLI printed."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("immunized")
    subject = write_images(root / "subject", n=2)
    opts = [x for k, v in IMMUNIZE_FAST.items() for x in ("-o", f"{k}={v}")]
    r = run_cli("immunize", "--tiny", *opts, str(subject), str(root / "model"))
    assert r.exit_code == 0, r.stderr
    quiet = run_cli("immunize", "--tiny", *opts, str(subject), str(root / "model"), "--resume", "-q")
    assert quiet.exit_code == 0
    return root, r, quiet


def test_immunize_names_its_base_and_prints_the_matching_attack(immunized):
    root, r, quiet = immunized
    note = json.loads((root / "model" / "cloak_model.json").read_text())
    assert note["base"] == "tiny-sd" and note["attack_preset"] == "apdm" and len(note["base_digest"]) == 64
    command = shlex.join(["cloak", "attack", "--preset", "apdm", "--model", str(root / "model"),
                          str(root / "subject"), "attacked/"])
    assert command in r.stderr and command not in r.stdout  # stdout: only the model directory's path
    assert r.stdout.strip() == str(root / "model")
    assert "--preset apdm" not in quiet.stderr  # -q: errors only


def test_attack_on_an_immunized_model_samples_class_images_from_its_base(immunized, tmp_path, cli, shared_cache):
    """Old behaviour: class images from the immunized model (its own cache key); now from the base it names."""
    from cloak.diffusion.class_images import model_key
    from cloak.models.handle import Models

    root, r, _ = immunized
    tokens = shlex.split(next(line for line in r.stderr.splitlines() if "cloak attack" in line).split(": ", 1)[1])
    assert tokens[:3] == ["cloak", "attack", "--preset"]
    args = tokens[2:-1] + [str(tmp_path / "attacked")]
    out = cli("attack", "--tiny", *args, *[x for k, v in TINY.items() for x in ("-o", f"{k}={v}")], "--json")
    assert out.exit_code == 0, out.stderr
    rep = json.loads(out.stdout)
    source = rep["summary"]["class_images_model"]
    assert source["id"] == "tiny-sd" and "immunize" in source["why"]
    base_key = model_key(Models(cache_dir=shared_cache, tiny=True).sd("tiny-sd"))
    folders = [c["folder"] for c in rep["summary"]["class_images"]]
    assert folders and all(Path(f).parts[-2] == base_key for f in folders), (folders, base_key)
    assert any(m["role"] == "class-images" and m["id"] == "tiny-sd" for m in rep["models"])
    assert rep["summary"]["preset"]["name"] == "apdm" and rep["options"]["lr"]["value"] == 5e-6
    # -o class_model: the attacked model itself, knowingly
    own = cli("attack", "--tiny", *args[:-1], str(tmp_path / "own"), "-o", f"class_model={root / 'model'}",
              *[x for k, v in TINY.items() for x in ("-o", f"{k}={v}")], "--json")
    assert own.exit_code == 0, own.stderr
    own_rep = json.loads(own.stdout)
    assert own_rep["summary"]["class_images_model"]["why"] == "-o class_model"
    assert all(Path(c["folder"]).parts[-2] != base_key for c in own_rep["summary"]["class_images"])


def test_a_model_without_a_named_base_samples_its_own_class_images(tmp_path):
    images = write_images(tmp_path / "in", n=1)
    rep = run_attack(images, tmp_path / "out", common=Common(tiny=True, options=dict(TINY), argv=[]))
    assert rep.summary["class_images_model"]["why"].startswith("the attacked model")
    assert "preset" not in rep.summary and "preset" not in rep.params


def test_a_base_whose_content_changed_since_immunize_is_named_in_a_warning(immunized, tmp_path):
    import shutil

    root, _, _ = immunized
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    note = json.loads((model / "cloak_model.json").read_text())
    (model / "cloak_model.json").write_text(json.dumps({**note, "base_digest": "0" * 64}))
    rep = run_attack(root / "subject", tmp_path / "out", preset="apdm",
                     common=Common(tiny=True, model=str(model), options=dict(TINY), argv=[]))
    assert rep.summary["class_images_model"]["base_digest_differs"] is True
    assert any("content differs from the base" in w for w in rep.warnings)
