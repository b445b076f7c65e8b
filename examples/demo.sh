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

echo "== real weights: DLADiff layer 2 against dlib's face ResNet (dlib-resnet), astronaut at 512², ε = 8/255" >&2
mkdir -p "$out/real/original"
python -c "import sys; from PIL import Image; from skimage import data; Image.fromarray(data.astronaut()).save(sys.argv[1])" \
  "$out/real/original/astronaut.png"
start=$SECONDS
cloak protect --method dladiff -o layers=zs -o encoders=dlib-resnet -o zs_steps=20 \
  "$out/real/original" "$out/real/protected"
echo "   (layer 2, 20 PGD steps: $((SECONDS - start)) s)" >&2
for which in original protected; do
  cloak score -q "$out/real/$which" --ref "$out/real/original" --metric ism,psnr -o ism.backend=dlib \
    --report "$out/real/scores-$which.json" >/dev/null
  python - "$out/real/scores-$which.json" "$out/real/original/astronaut.png" "$out/real/$which/astronaut.png" \
    "$which" <<'PY' >&2
import json, subprocess, sys
report, original, image, which = sys.argv[1:5]
scores = json.load(open(report))["items"][0]["scores"]
verdict = json.loads(subprocess.run([sys.executable, "examples/dlib_distance.py", original, image],
                                    capture_output=True, text=True, check=True).stdout)
psnr = "inf" if scores.get("psnr") is None else f"{scores['psnr']:.1f} dB"
print(f"   {which:>9}: dlib ISM {scores['ism']:.4f}, dlib distance {verdict['distance']:.3f} "
      f"(same person below {verdict['threshold']}: {'yes' if verdict['same_person'] else 'no'}), PSNR {psnr}")
PY
done
echo "   white-box: the attacked network is the one dlib scores with; transfer to other recognizers is not measured" >&2

echo "reports: $out/protected/report.json $out/attack/report.json $out/scores-*.json $out/real/" >&2
