#!/usr/bin/env bash
# Submit `crossmoco pretrain|tune ...` to a Ray cluster as a job, with this checkout as the working dir.
#
#   cluster/submit.sh [--address URL] [--runtime-env FILE] [--no-wait] [--id ID] -- pretrain|tune [ARGS...]
#
#   cluster/submit.sh -- pretrain --preset paper --data s3://bucket/shards --storage s3://bucket/runs \
#       train.num_workers=8 train.use_gpu=true
#
# The address: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (http://HEAD:8265; `ray dashboard cluster/aws.yaml` forwards it to
# http://127.0.0.1:8265). Token authentication: RAY_AUTH_MODE=token and the cluster's token in
# ~/.ray/auth_token or RAY_AUTH_TOKEN. The runtime environment (env vars, excludes): cluster/runtime_env.yaml.
# The job runs `python -m crossmoco_ray.cli ...` from the uploaded working dir, so the cluster needs the
# dependencies (the project's image has them), not this exact version of the package.
set -euo pipefail
cd "$(dirname "$0")/.."

address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-}}"
runtime_env="cluster/runtime_env.yaml"
wait_flag=()
id="crossmoco-$(date +%Y%m%d-%H%M%S)-$$"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --runtime-env) runtime_env="$2"; shift 2 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --id) id="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (put the crossmoco command after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 || ( "$1" != "pretrain" && "$1" != "tune" && "$1" != "eval" && "$1" != "prepare" ) ]]; then
  echo "usage: cluster/submit.sh [--address URL] [--runtime-env FILE] -- pretrain|tune|eval|prepare ARGS..." >&2
  exit 2
fi
if [[ -z "$address" ]]; then
  echo "no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS" >&2
  exit 2
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
echo "submitting job $id to $address: crossmoco $*"
exec ray job submit --address "$address" --submission-id "$id" \
  --working-dir . --runtime-env "$runtime_env" "${wait_flag[@]}" \
  -- python -m crossmoco_ray.cli "$@"
