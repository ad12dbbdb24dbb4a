#!/usr/bin/env bash
# Held-out figures of the few-step students beside the base (docs/shapes_world.md, "Few-step students"):
# each student at 1, 2 and 4 Euler steps and the base at 20, 4 and 1, all at CFG 1 on the eval split
# (63 prompts x 4 seeds = 252 images). Writes OUT/<model>-<steps>/metrics.json and prints the table.
# usage: scripts/student_figures.sh [OUT]   (about 3 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/student-figures}
DIFFRL=${DIFFRL:-.venv/bin/diffrl}
run() {  # model steps
  local name; name=$(basename "$1")-$2
  "$DIFFRL" eval --model "$1" eval.num_steps="$2" eval.guidance_scale=1.0 eval.seeds_per_prompt=4 \
    output_dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name done"
}
mkdir -p "$OUT"
for steps in 20 4 1; do run assets/shapes-base-3k "$steps"; done
for model in assets/shapes-student-4step assets/shapes-student-1step; do
  for steps in 1 2 4; do run "$model" "$steps"; done
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ["strict", "count", "color", "shape", "partial", "fid_shapes", "diversity"]
print("| model | steps | " + " | ".join(keys) + " |")
print("| --- | --- | " + " | ".join("---" for _ in keys) + " |")
for d in sorted(out.iterdir()):
    f = d / "metrics.json"
    if f.is_file():
        m = json.loads(f.read_text())
        name, steps = d.name.rsplit("-", 1)
        print(f"| {name} | {steps} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
PY
