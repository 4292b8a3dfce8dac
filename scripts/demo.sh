#!/usr/bin/env bash
# `make demo`: train a fully binary CNN on the embedded digits data, end to end, on the CPU.
#   1. a float twin briefly (the distillation teacher)
#   2. the BCNN in two steps (binary activations, then binary weights too), distilled
#   3. evaluate it on the held-out validation split, print its summary
#   4. (engine) pack it and run it with XOR-popcount kernels
# Output: runs/demo (gitignored). A few minutes on 2 cores.
set -euo pipefail

OUT="${DEMO_OUT:-runs/demo}"
MODEL="${DEMO_MODEL:-bcnn_cifar}"
EPOCHS="${DEMO_EPOCHS:-10}"
SEED="${DEMO_SEED:-1}"
START=$(date +%s)

rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1/4 float twin teacher ($MODEL, binary=False) on digits"
bcnn train --model "$MODEL" --data digits --float --epochs 4 --seed "$SEED" \
  --out "$OUT/teacher" --quiet
bcnn eval "$OUT/teacher/final.pt"

echo "== 2/4 BCNN: step 1 (binary activations) + step 2 (binary weights), distilled"
bcnn train --model "$MODEL" --data digits --epochs "$EPOCHS" --seed "$SEED" \
  --teacher "$OUT/teacher/final.pt" --out "$OUT/bcnn"

echo "== 3/4 evaluate on the validation split (the run's seeded 10% hold-out) and summarise"
bcnn eval "$OUT/bcnn/final.pt" --data digits --json | tee "$OUT/eval.json"
bcnn summary "$OUT/bcnn/final.pt" --input-size 1 8 8

echo "== 4/4 packed engine"
bcnn pack "$OUT/bcnn/final.pt" -o "$OUT/bcnn/model.bcnn"
echo "-- packed engine == torch on the validation split:"
python scripts/check_packed.py "$OUT/bcnn/final.pt" "$OUT/bcnn/model.bcnn"
bcnn eval "$OUT/bcnn/model.bcnn" --engine packed --json
echo "-- speed, batch 1, one thread (this digits model is tiny: 8x8 inputs):"
bcnn bench "$OUT/bcnn/final.pt" --size 8 8 --json
echo "-- speed of the full-size bcnn_cifar (32x32, random weights), batch 1, one thread:"
bcnn bench bcnn_cifar --json

echo "== done in $(( $(date +%s) - START ))s: $OUT/bcnn/{final.pt,metrics.csv,curves.png}"
