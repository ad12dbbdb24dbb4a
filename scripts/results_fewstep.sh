#!/usr/bin/env bash
# The few-step runs behind docs/results.md, "Few-step students": SDPO on the 4-step shapes student
# (deploy/configs/shapes-cpu-sdpo.yaml) and Flow-GRPO on the same student and budget as the control, two
# seeds each, two runs at a time; then each run's final p_samp evaluated at 1, 2 and 4 steps and
# `diffrl report` over the four runs. About 70 minutes on 2 cores.
#   scripts/results_fewstep.sh [OUT_DIR] [extra key=value overrides for every run]
# PHASES="grpo eval" runs only those phases (default: sdpo grpo eval).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/results-fewstep}; shift || true
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
common=(run.output_dir="$out" run.progress=false "$@")
# Flow-GRPO on the student: its SDE on the student's own grid (uniform, 4 steps), evaluated at 4 steps
grpo=(model.path=assets/shapes-student-4step sampler.sampling.num_steps=4 "sampler.sampling.sigmas=[1.0,0.75,0.5,0.25,0.0]"
      learner.grpo.num_sampling_steps=4 learner.grpo.sigma_grid=uniform eval.num_steps=4)

train() {  # NAME RECIPE [overrides...]
  local name=$1 recipe=$2; shift 2
  mkdir -p "$out"
  .venv/bin/diffrl train "$recipe" run.name="$name" ray.temp_dir="/tmp/dr-$name" "${common[@]}" "$@" \
    > "$out/$name.log" 2>&1
}
steps_eval() {  # NAME: the run's final p_samp at 1 and 2 steps (4 is the run's own evaluation)
  for s in 1 2; do
    .venv/bin/diffrl eval --model "$out/$1" eval.num_steps=$s eval.guidance_scale=1.0 eval.seeds_per_prompt=2 \
      output_dir="$out/$1-eval$s" > "$out/$1-eval$s.log" 2>&1
  done
}
phases=${PHASES:-sdpo grpo eval}
if [[ " $phases " == *" sdpo "* ]]; then
  train sdpo-s0 deploy/configs/shapes-cpu-sdpo.yaml run.seed=0 &
  train sdpo-s1 deploy/configs/shapes-cpu-sdpo.yaml run.seed=1 &
  wait
fi
if [[ " $phases " == *" grpo "* ]]; then
  train grpo-student-s0 deploy/configs/shapes-cpu-grpo.yaml run.seed=0 "${grpo[@]}" &
  train grpo-student-s1 deploy/configs/shapes-cpu-grpo.yaml run.seed=1 "${grpo[@]}" &
  wait
fi
[[ " $phases " == *" eval "* ]] || exit 0
for run in sdpo-s0 sdpo-s1 grpo-student-s0 grpo-student-s1; do steps_eval "$run"; done
for s in 1 2; do  # the student itself at 1 and 2 steps, on the same seeds
  .venv/bin/diffrl eval --model assets/shapes-student-4step eval.num_steps=$s eval.guidance_scale=1.0 \
    eval.seeds_per_prompt=2 output_dir="$out/student-eval$s" > "$out/student-eval$s.log" 2>&1
done
.venv/bin/diffrl report "$out"/sdpo-s0 "$out"/sdpo-s1 "$out"/grpo-student-s0 "$out"/grpo-student-s1 \
  --out "$out/report" --target +0.10
