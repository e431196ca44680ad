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
# ~/.ray/auth_token or RAY_AUTH_TOKEN. The runtime environment (env vars, excludes): --runtime-env, else
# CROSSMOCO_RUNTIME_ENV, else cluster/runtime_env.yaml (a cluster: set its MLFLOW_TRACKING_URI first; a
# single-machine head from cluster/local_head.sh: cluster/runtime_env.local.yaml).
# The job runs `python -m crossmoco_ray.cli ...` from the uploaded working dir, so the cluster needs the
# dependencies (the project's image has them), not this exact version of the package.
set -euo pipefail
cd "$(dirname "$0")/.."

address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-}}"
runtime_env="${CROSSMOCO_RUNTIME_ENV:-cluster/runtime_env.yaml}"
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
# A placeholder tracking URI would fail only inside the job, after MLflow's connection retries: stop here.
if grep -q "^[^#]*YOUR-MLFLOW-HOST" "$runtime_env"; then
  echo "$runtime_env: MLFLOW_TRACKING_URI is still the placeholder (CHANGE ME): set your MLflow server;" \
    "on a single-machine head use --runtime-env cluster/runtime_env.local.yaml" >&2
  exit 2
fi
# The uploaded code has no .git (runtime_env.yaml excludes it): hand this checkout's commit to the job in
# CROSSMOCO_GIT_COMMIT (crossmoco_ray/version.py), "-dirty" when tracked files have uncommitted changes.
commit="$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)"
if [[ "$commit" != unknown && -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  commit="$commit-dirty"
fi
if ! env_json="$("${PYTHON:-python3}" - "$runtime_env" "$commit" <<'PY'
import json, sys, yaml
env = yaml.safe_load(open(sys.argv[1])) or {}
env.setdefault("env_vars", {})["CROSSMOCO_GIT_COMMIT"] = sys.argv[2]
print(json.dumps(env))
PY
)"; then
  echo "could not add the commit to $runtime_env (needs python3 with PyYAML, or set PYTHON)" >&2
  exit 2
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
echo "submitting job $id to $address (code $commit): crossmoco $*"
exec ray job submit --address "$address" --submission-id "$id" \
  --working-dir . --runtime-env-json "$env_json" "${wait_flag[@]}" \
  -- python -m crossmoco_ray.cli "$@"
