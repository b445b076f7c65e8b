#!/usr/bin/env bash
# The main job on the built-in tiny-sd model: protect → attack → score, in a minute or two on a CPU.
# tiny-sd has random weights: this shows the pipeline and its reports, it protects nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DEMO_OUT:-demo-out}
rm -rf "$out"
python examples/make_photos.py examples >/dev/null
common=(--tiny --resolution 64 -o class_images=8)

echo "== protect (dladiff: layer 1 against fine-tuning + layer 2 against identity encoders; effort 0.2)" >&2
cloak protect --method dladiff "${common[@]}" --effort 0.2 --ref examples/clean examples/photos "$out/protected"

echo "== attack (dreambooth on the protected photos)" >&2
cloak attack "${common[@]}" --steps 40 --num-images 2 --sample-steps 10 --ref examples/clean \
  "$out/protected" "$out/attack"

echo "== score: the protected photos against the originals (budget: 6.4 + 8 = 14.4 levels over both layers)" >&2
cloak score "$out/protected" --ref examples/photos --metric psnr,ssim,linf --report "$out/scores-protected.json"

echo "== score: the attacker's generations (identity metrics; stand-in face models with --tiny)" >&2
cloak score "$out/attack/gen" --ref examples/photos --tiny --metric fdfr,ism --report "$out/scores-attack.json"

echo "reports: $out/protected/report.json $out/attack/report.json $out/scores-*.json" >&2
