#!/usr/bin/env bash
# fid_text of text-world models on several sets of held-out seeds (SEEDS, default 20000 30000 40000 50000
# 60000: the first is the runs' own evaluation pairs), and their mean: the fidelity figure of
# docs/results.md, "The text world" (one evaluation's fid_text moves by about ±0.04 from one seed set to
# the next). Each MODEL is a run folder (its latest p_samp) or a model folder.
#   [SEEDS="20000 30000"] scripts/fid_text_seeds.sh OUT_DIR MODEL [MODEL...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
for model in "$@"; do
  name=$(basename "$model")
  for seed in ${SEEDS:-20000 30000 40000 50000 60000}; do
    .venv/bin/diffrl eval --model "$model" --prompts text:eval eval.seed=$seed eval.seeds_per_prompt=2 \
      eval.guidance_scale=1 output_dir="$out/$name-$seed" > "$out.$name-$seed.log" 2>&1
  done
  .venv/bin/python - "$out" "$name" ${SEEDS:-20000 30000 40000 50000 60000} <<'PY'
import json, math, sys
out, name, seeds = sys.argv[1], sys.argv[2], sys.argv[3:]
vals = [json.load(open(f"{out}/{name}-{s}/metrics.json"))["fid_text"] for s in seeds]
mean = sum(vals) / len(vals)
sem = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals)) if len(vals) > 1 else 0.0
print(f"{name}: fid_text " + " ".join(f"{v:.3f}" for v in vals) + f"  mean {mean:.3f} ± {sem:.3f}")
PY
done
