#!/usr/bin/env bash
# The learner-step benchmark of docs/benchmarks.md, "Learner step against its own passes": one
# `diffrl bench learner` per shapes recipe, one after another on an otherwise idle machine, then a table.
#   scripts/bench_learners.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-learners}; mkdir -p "$out"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
for recipe in shapes-cpu shapes-cpu-grpo shapes-cpu-sdpo shapes-cpu-tdmr1; do
  .venv/bin/diffrl bench learner "deploy/configs/$recipe.yaml" --steps 3 2>/dev/null | sed -n '/^{/,/^}/p' > "$out/$recipe.json"
done
.venv/bin/python - "$out" <<'PY'
import json, pathlib, sys
print("| recipe | algorithm | groups x K | step s | denoiser calls (with grad) | bound s | bound / step |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    print(f"| {f.stem} | {d['algorithm']} | {d['groups_per_step']} x {d['k']} | {d['step_seconds_last']} | "
          f"{d['denoiser_calls']} ({d['calls_with_grad']}) | {d['bound_seconds']} | {d['bound_over_step']} |")
PY
