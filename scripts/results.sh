#!/usr/bin/env bash
# The runs behind docs/results.md: CRD, its three ablations and the two baselines on the longer-trained
# base (deploy/configs/shapes-cpu*.yaml), same budget each, two at a time on one machine, then
# `diffrl report` over all of them.
#   scripts/results.sh [OUT_DIR] [extra key=value overrides for every run]
# Budget per run: the recipes' own (run.max_seconds 1800 s of training loop, evaluation every 50 steps),
# with two runs sharing the machine, so each has about one core. About 130 min on 2 cores (the
# baselines run two seeds each).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/results}; shift || true
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
common=(run.output_dir="$out" run.progress=false "$@")
crd=deploy/configs/shapes-cpu.yaml

train() {  # NAME RECIPE [overrides...]
  local name=$1 recipe=$2; shift 2
  mkdir -p "$out"
  .venv/bin/diffrl train "$recipe" run.name="$name" ray.temp_dir="/tmp/dr-$name" "${common[@]}" "$@" \
    > "$out/$name.log" 2>&1
}

train crd-s0 "$crd" run.seed=0 &
train nft-s0 deploy/configs/shapes-cpu-nft.yaml run.seed=0 &
wait
train grpo-s0 deploy/configs/shapes-cpu-grpo.yaml run.seed=0 &
train crd-no-decoupled "$crd" run.seed=0 learner.crd.decoupled_sampler=false &
wait
train crd-no-kl "$crd" run.seed=0 learner.crd.use_kl_anchor=false &
train crd-fixed-kl "$crd" run.seed=0 learner.crd.reward_adaptive_kl=false &
wait
train nft-s1 deploy/configs/shapes-cpu-nft.yaml run.seed=1 &
train grpo-s1 deploy/configs/shapes-cpu-grpo.yaml run.seed=1 &
wait
.venv/bin/diffrl report "$out"/crd-s0 "$out"/nft-s0 "$out"/nft-s1 "$out"/grpo-s0 "$out"/grpo-s1 \
  "$out"/crd-no-decoupled "$out"/crd-no-kl "$out"/crd-fixed-kl --out "$out/report" --target +0.15
