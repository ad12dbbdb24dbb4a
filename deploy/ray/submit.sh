#!/usr/bin/env bash
# Submit `diffrl train` to a running Ray cluster as a Ray job, from the repository root:
#
#   RAY_ADDRESS=http://HEAD:8265 deploy/ray/submit.sh RECIPE [key=value ...]
#
# = ray job submit --address $RAY_ADDRESS --working-dir . --runtime-env deploy/ray/runtime_env.yaml \
#       -- diffrl train RECIPE [key=value ...] ray.address=auto
#
# The driver runs on the head node, connects to the cluster (ray.address=auto), and starts the
# learner ranks and samplers as actors; rewards are the recipe's (rewards[i].urls of running reward
# services, or local servers on the head), Redis is redis.url / $REDIS_URL or an embedded one.
# Auth: Ray 2.60 has token auth on by default. Either run the cluster and this script with
# RAY_AUTH_MODE=disabled (inside a private network only), or use tokens: `ray get-auth-token
# --generate` on the head, then RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... here.
# Extra ray job submit options: SUBMISSION_ID=name (a fixed job id), NO_WAIT=1 (return at once;
# follow with `ray job logs -f ID`, stop with `ray job stop ID`: the driver tears its stack down).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,20p' "$0"; exit 2; }
cd "$(dirname "$0")/../.."
: "${RAY_ADDRESS:=http://127.0.0.1:8265}"
export RAY_ADDRESS RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env deploy/ray/runtime_env.yaml \
    ${SUBMISSION_ID:+--submission-id "$SUBMISSION_ID"} ${NO_WAIT:+--no-wait} \
    -- diffrl train "$@" ray.address=auto
