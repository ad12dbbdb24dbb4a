#!/usr/bin/env bash
# The runs behind docs/results.md, "DIDR" and "The four seeds side by side": DIDR on the 1-step shapes
# student (deploy/configs/shapes-cpu-didr.yaml) beside its beta -> inf control (plain distribution
# matching), seed 0 then seed 1, two runs at a time; CRD on the base, two seeds (its earlier runs'
# folders were not kept); then `diffrl report` of this issue's runs and of every algorithm side by side
# (the NFT, GRPO, SDPO and TDM-R1 folders of scripts/results.sh, results_fewstep.sh, results_tdmr1.sh).
# About 100 minutes on 2 cores.
#   scripts/results_didr.sh [OUT_DIR] [extra key=value overrides for every run]
# PHASES="didr0" runs only that phase (default: crd didr0 didr1 report); FEWSTEP, TDMR1 and FAITHFUL name
# the other scripts' output folders (default runs/results20, runs/results21, runs/results18).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/results22}; shift || true
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
common=(run.output_dir="$out" run.progress=false "$@")
train() {  # NAME RECIPE [overrides...]
  local name=$1 recipe=$2; shift 2
  mkdir -p "$out"
  .venv/bin/diffrl train "$recipe" run.name="$name" ray.temp_dir="/tmp/dr-$name" "${common[@]}" "$@" \
    > "$out/$name.log" 2>&1
}
didr=deploy/configs/shapes-cpu-didr.yaml
phases=${PHASES:-crd didr0 didr1 report}
if [[ " $phases " == *" crd "* ]]; then
  train crd-s0 deploy/configs/shapes-cpu.yaml run.seed=0 &
  train crd-s1 deploy/configs/shapes-cpu.yaml run.seed=1 &
  wait
fi
for s in 0 1; do
  if [[ " $phases " == *" didr$s "* ]]; then
    train didr-s$s "$didr" run.seed=$s &
    train didr-control-s$s "$didr" run.seed=$s learner.didr.beta=.inf &
    wait
  fi
done
if [[ " $phases " == *" report "* ]]; then
  .venv/bin/diffrl report "$out"/didr-s0 "$out"/didr-s1 "$out"/didr-control-s0 "$out"/didr-control-s1 \
    --out "$out/report-didr" --target +0.10
  fewstep=${FEWSTEP:-runs/results20} tdmr1=${TDMR1:-runs/results21} faithful=${FAITHFUL:-runs/results18}
  .venv/bin/diffrl report "$out"/crd-s0 "$out"/crd-s1 "$faithful"/nft-s0 "$faithful"/nft-s1 \
    "$faithful"/grpo-s0 "$faithful"/grpo-s1 "$fewstep"/sdpo-s0 "$fewstep"/sdpo-s1 "$tdmr1"/tdmr1-s0 \
    "$tdmr1"/tdmr1-s1 "$fewstep"/grpo-student-s0 "$fewstep"/grpo-student-s1 "$out"/didr-s0 "$out"/didr-s1 \
    "$out"/didr-control-s0 "$out"/didr-control-s1 --out "$out/report-all" --target +0.10 --target-from each
fi
