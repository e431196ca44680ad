#!/usr/bin/env bash
# A local Ray head for `crossmoco pretrain|tune` and `ray job submit` on this machine.
#
#   cluster/local_head.sh start [--num-cpus N] [--num-gpus N]   # start, print how clients connect
#   cluster/local_head.sh status
#   cluster/local_head.sh stop                                  # stop only what `start` started
#
# - Every server of the head (GCS, raylet, object manager, workers, dashboard and its job API, agents,
#   metrics) listens on 127.0.0.1 only: clients on this machine, nobody else. For a head other machines
#   join, see docs/cluster.md (ports to open inside the cluster's private network).
# - Token authentication stays on: a token is generated if none exists (~/.ray/auth_token), so the head
#   requires it; clients use it with RAY_AUTH_MODE=token.
# - Every process of this head runs under its own temp dir ($CROSSMOCO_HEAD_DIR, default /tmp/cmh-UID):
#   `stop` signals exactly the processes whose command line names that dir (never `ray stop`, which ends
#   every Ray process of the user on the machine). Keep the dir short: Ray's unix socket paths must fit
#   in 107 bytes. The dir is yours alone (mode 0700): one that exists and that someone else owns or may
#   write to is refused (Ray's own session dirs inside it are world-writable).
set -euo pipefail

HEAD_DIR="${CROSSMOCO_HEAD_DIR:-/tmp/cmh-$(id -u)}"
PORT="${CROSSMOCO_HEAD_PORT:-6379}"
DASHBOARD_PORT="${CROSSMOCO_DASHBOARD_PORT:-8265}"
PIDS="$HEAD_DIR/head.pids"
# More `ray start` options, e.g. other ports when a second Ray runs on this machine:
#   CROSSMOCO_HEAD_OPTIONS="--ray-client-server-port=10101 --dashboard-agent-listen-port=52465"
read -r -a HEAD_OPTIONS <<<"${CROSSMOCO_HEAD_OPTIONS:-}"

head_pids() {  # live processes of this head: their command line names HEAD_DIR
  local pid
  for pid in $(pgrep -f -- "$HEAD_DIR" || true); do
    [[ "$pid" == "$$" ]] && continue
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$HEAD_DIR/"; then
      echo "$pid"
    fi
  done
}

private_dir() {  # $1 exists as a real directory of this user, mode 0700, or is made so; else refuse
  local dir="$1"
  if [[ -L "$dir" ]]; then
    echo "$dir is a symbolic link: refused (set CROSSMOCO_HEAD_DIR to a directory of your own)" >&2
    exit 1
  fi
  if [[ ! -e "$dir" ]]; then
    mkdir -m 700 "$dir"
  fi
  if [[ ! -d "$dir" || "$(stat -c %u "$dir")" != "$(id -u)" ]]; then
    echo "$dir is not a directory of yours: refused (someone else may have made it;" \
      "set CROSSMOCO_HEAD_DIR to a directory of your own)" >&2
    exit 1
  fi
  chmod 700 "$dir"
}

start() {
  local extra=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --num-cpus|--num-gpus) extra+=("$1" "$2"); shift 2 ;;
      *) echo "unknown option $1" >&2; exit 2 ;;
    esac
  done
  if [[ -n "$(head_pids)" ]]; then
    echo "a head already runs under $HEAD_DIR (cluster/local_head.sh status)" >&2
    exit 1
  fi
  private_dir "$HEAD_DIR"
  mkdir -p -m 700 "$HEAD_DIR/tmp"
  # Token authentication: `ray start --head` turns it on only when a token exists, so make sure one does.
  if [[ "${RAY_AUTH_MODE:-token}" != "disabled" ]]; then
    ray get-auth-token --generate >/dev/null 2>&1
    chmod 600 "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" 2>/dev/null || true  # Ray writes it 0644
  fi
  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as the node's address (Ray 2.60 otherwise swaps a
  # loopback --node-ip-address for the machine's outward one, and its servers follow the node address).
  RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head \
    --port="$PORT" --node-ip-address=127.0.0.1 \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --temp-dir="$HEAD_DIR/tmp" \
    --disable-usage-stats \
    "${extra[@]}" "${HEAD_OPTIONS[@]}" >"$HEAD_DIR/start.log" 2>&1 || { cat "$HEAD_DIR/start.log" >&2; exit 1; }
  head_pids >"$PIDS"
  cat <<MSG
Ray head started ($(wc -l <"$PIDS") processes, listed in $PIDS; log: $HEAD_DIR/start.log)
Clients on this machine:
  export RAY_AUTH_MODE=token    # the token: ~/.ray/auth_token (print it: ray get-auth-token)
  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
  export CROSSMOCO_RUNTIME_ENV=cluster/runtime_env.local.yaml   # one machine: MLflow's default sqlite store
  cluster/submit.sh -- pretrain                          # a job (ray job submit) on this head
  RAY_ADDRESS=127.0.0.1:$PORT crossmoco pretrain        # or a driver in this shell, joining the head
Dashboard: http://127.0.0.1:$DASHBOARD_PORT      Stop: cluster/local_head.sh stop
MSG
}

status() {
  local pids
  pids="$(head_pids)"
  if [[ -z "$pids" ]]; then
    echo "no head runs under $HEAD_DIR"
    return 1
  fi
  echo "head under $HEAD_DIR: $(echo "$pids" | wc -l) processes"
  RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}" ray status --address "127.0.0.1:$PORT" 2>/dev/null || true
}

stop() {
  local pids pid
  pids="$( (cat "$PIDS" 2>/dev/null || true; head_pids) | sort -u)"
  if [[ -z "$pids" ]]; then
    echo "no head runs under $HEAD_DIR"
    return 0
  fi
  for pid in $pids; do  # only processes that still belong to this head (PIDs can be reused)
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$HEAD_DIR/"; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  # Give them 10 s to exit cleanly, then SIGKILL whatever is left (a dying raylet may still have spawned a
  # worker) until no process of this head remains.
  for attempt in $(seq 1 100); do
    [[ -z "$(head_pids)" ]] && break
    if (( attempt > 50 )); then
      for pid in $(head_pids); do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    sleep 0.2
  done
  if [[ -n "$(head_pids)" ]]; then
    echo "could not stop: $(head_pids | tr '\n' ' ')" >&2
    exit 1
  fi
  rm -f "$PIDS"
  echo "stopped the head under $HEAD_DIR"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  start) start "$@" ;;
  status) status ;;
  stop) stop ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
