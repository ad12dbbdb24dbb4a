#!/usr/bin/env bash
# The TDM-R1 runs behind docs/results.md, "Few-step students": TDM-R1 on the 4-step shapes student
# (deploy/configs/shapes-cpu-tdmr1.yaml) and the ablation without the surrogate term (trunc_steps 0:
# the generator gets only the distillation and CFG-as-reward terms; the surrogate still trains, so its
# rank agreement is still measured), two seeds each, two runs at a time; then `diffrl report`.
# About 65 minutes on 2 cores.
#   scripts/results_tdmr1.sh [OUT_DIR] [extra key=value overrides for every run]
# PHASES="tdmr1" runs only that phase (default: tdmr1 ablation report).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/results-tdmr1}; shift || true
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
common=(run.output_dir="$out" run.progress=false "$@")
train() {  # NAME [overrides...]
  local name=$1; shift
  mkdir -p "$out"
  .venv/bin/diffrl train deploy/configs/shapes-cpu-tdmr1.yaml run.name="$name" ray.temp_dir="/tmp/dr-$name" \
    "${common[@]}" "$@" > "$out/$name.log" 2>&1
}
phases=${PHASES:-tdmr1 ablation report}
if [[ " $phases " == *" tdmr1 "* ]]; then
  train tdmr1-s0 run.seed=0 &
  train tdmr1-s1 run.seed=1 &
  wait
fi
if [[ " $phases " == *" ablation "* ]]; then
  train tdmr1-nosurrogate-s0 run.seed=0 learner.tdmr1.trunc_steps=0 &
  train tdmr1-nosurrogate-s1 run.seed=1 learner.tdmr1.trunc_steps=0 &
  wait
fi
if [[ " $phases " == *" report "* ]]; then
  .venv/bin/diffrl report "$out"/tdmr1-s0 "$out"/tdmr1-s1 "$out"/tdmr1-nosurrogate-s0 "$out"/tdmr1-nosurrogate-s1 \
    --out "$out/report" --target +0.10
fi
