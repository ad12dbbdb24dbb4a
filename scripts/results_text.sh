#!/usr/bin/env bash
# The runs behind docs/results.md, "The text world": CRD on the text-world base (deploy/configs/ocr-cpu.yaml,
# beta_KL 100; first round: beta_KL 10) against a real OCR reward server, seeds 0 and 1 side by side (30 minutes each, both at once on
# the 2-core machine), then the same with the shapes recipe's beta_KL 3; then `diffrl report` with the
# target on held-out exact match (+0.15). About 75 minutes.
#   scripts/results_text.sh [OUT_DIR] [extra key=value overrides for every run]
# PHASES="crd" runs only that phase (default: crd kl3 report). The second round of docs/results.md ("A stronger
# anchor"): PHASES="kl30 kl100 report2", then scripts/fid_text_seeds.sh on its final models.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/results23}; shift || true
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
common=(run.output_dir="$out" run.progress=false "$@")
train() {  # NAME RECIPE [overrides...]
  local name=$1 recipe=$2; shift 2
  mkdir -p "$out"
  .venv/bin/diffrl train "$recipe" run.name="$name" ray.temp_dir="/tmp/dr-$name" "${common[@]}" "$@" \
    > "$out/$name.log" 2>&1
}
phases=${PHASES:-crd kl3 report}
if [[ " $phases " == *" crd "* ]]; then
  train ocr-crd-kl10-s0 deploy/configs/ocr-cpu.yaml run.seed=0 learner.crd.beta_kl=10.0 &
  train ocr-crd-kl10-s1 deploy/configs/ocr-cpu.yaml run.seed=1 learner.crd.beta_kl=10.0 &
  wait
fi
if [[ " $phases " == *" kl3 "* ]]; then
  train ocr-crd-s0 deploy/configs/ocr-cpu.yaml run.seed=0 learner.crd.beta_kl=3.0 &
  train ocr-crd-s1 deploy/configs/ocr-cpu.yaml run.seed=1 learner.crd.beta_kl=3.0 &
  wait
fi
if [[ " $phases " == *" kl30 "* ]]; then
  train ocr-crd-kl30-s0 deploy/configs/ocr-cpu.yaml run.seed=0 learner.crd.beta_kl=30.0 &
  train ocr-crd-kl30-s1 deploy/configs/ocr-cpu.yaml run.seed=1 learner.crd.beta_kl=30.0 &
  wait
fi
if [[ " $phases " == *" kl100 "* ]]; then
  train ocr-crd-kl100-s0 deploy/configs/ocr-cpu.yaml run.seed=0 &
  train ocr-crd-kl100-s1 deploy/configs/ocr-cpu.yaml run.seed=1 &
  wait
fi
if [[ " $phases " == *" report2 "* ]]; then
  .venv/bin/diffrl report "$out"/ocr-crd-kl30-s0 "$out"/ocr-crd-kl30-s1 "$out"/ocr-crd-kl100-s0 "$out"/ocr-crd-kl100-s1 \
    --out "$out/report-anchor" --target-metric ocr_exact --target +0.15
fi
if [[ " $phases " == *" report "* ]]; then
  .venv/bin/diffrl report "$out"/ocr-crd-kl10-s0 "$out"/ocr-crd-kl10-s1 "$out"/ocr-crd-s0 "$out"/ocr-crd-s1 \
    --out "$out/report" --target-metric ocr_exact --target +0.15
fi
