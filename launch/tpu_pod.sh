#!/usr/bin/env bash
# Cloud TPU VM pod slices: create (or reuse) the TPU VM, copy this checkout to every worker and
# install it, then run the same `ptuning` command on all workers at once (`--worker=all`) and
# stream their output here. On TPU VMs ptuning/distributed.py finds the coordinator, process
# count and ids itself (no flags needed). Rerunning the same command resumes from MODEL_DIR.
#
# Usage: launch/tpu_pod.sh [SUBCOMMAND ptuning arguments ...]
#   e.g. TPU_NAME=pt-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-128 launch/tpu_pod.sh train \
#          --gin_file=runs/train.gin --gin_file=methods/prompt_tuning.gin \
#          --gin_file=models/t5_1_1_xxl.gin --gin_file=partitioning/model_parallel.gin \
#          --gin.MODEL_DIR=gs://bucket/runs/xxl ...
#   MODEL_DIR must be visible to every worker (a gs:// bucket, or a shared file system).
#
# Variables:
#   TPU_NAME          (required) name of the TPU VM
#   ZONE              (required) e.g. us-central2-b (v4), us-west4-a (v5e)
#   PROJECT           Google Cloud project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  slice to create if TPU_NAME does not exist, e.g. v4-128, v5litepod-256
#                     (default v4-8)
#   RUNTIME_VERSION   TPU VM software version when creating (default tpu-ubuntu2204-base)
#   SPOT              1: create a Spot (preemptible) TPU VM (default 0)
#   ACTION            run (default: create if needed, install, run, stream), setup (create if
#                     needed and install only), stop (SIGTERM the running command on every
#                     worker: each finishes its step, saves and exits), delete (delete the VM)
#   REMOTE_DIR        checkout location on the workers (default ptuning, under the home dir)
#   PIP_EXTRAS        extras installed on the workers (default tpu)
#   LOG_FILE          local file that also receives the streamed output
#                     (default logs/$TPU_NAME-<date>.log)
#   JAX_COMPILATION_CACHE_DIR  passed on to every worker: JAX's persistent compilation cache
#                     (e.g. gs://bucket/xla_cache), so that a resumed or repeated run loads its
#                     compiled step instead of compiling it again (default: no cache)
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TPU_NAME:?set TPU_NAME, the TPU VM name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-0}
ACTION=${ACTION:-run}
REMOTE_DIR=${REMOTE_DIR:-ptuning}
PIP_EXTRAS=${PIP_EXTRAS:-tpu}
LOG_FILE=${LOG_FILE:-logs/$TPU_NAME-$(date +%Y%m%d-%H%M%S).log}

gcloud_args=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then gcloud_args+=(--project="$PROJECT"); fi
tpu() { gcloud compute tpus tpu-vm "$@" "${gcloud_args[@]}"; }
on_all_workers() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

create_if_missing() {
  if tpu describe "$TPU_NAME" --format='value(state)' >/dev/null 2>&1; then
    echo "reusing TPU VM $TPU_NAME ($(tpu describe "$TPU_NAME" --format='value(acceleratorType)'))"
    return
  fi
  local create_args=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then create_args+=(--spot); fi
  echo "creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE) in $ZONE"
  tpu create "$TPU_NAME" "${create_args[@]}"
}

install() {
  local archive
  archive=$(mktemp -t ptuning-XXXXXX.tgz)
  # Tracked and untracked-but-not-ignored files: what the working tree holds, without .venv.
  git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -
  tpu scp "$archive" "$TPU_NAME:ptuning.tgz" --worker=all
  rm -f "$archive"
  on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -xzf ptuning.tgz -C $REMOTE_DIR
    cd $REMOTE_DIR && { [ -x .venv/bin/python ] || python3 -m venv .venv; }
    .venv/bin/pip install -q -e '.[$PIP_EXTRAS]'"
}

stop_on_all_workers() {
  # shellcheck disable=SC2016  # expanded on the workers
  on_all_workers 'if [ -f ptuning.pid ]; then kill -TERM "$(cat ptuning.pid)" || true; fi'
}

case "$ACTION" in
  delete) tpu delete "$TPU_NAME" --quiet; exit 0 ;;
  stop) stop_on_all_workers; exit 0 ;;
  setup) create_if_missing; install; exit 0 ;;
  run) ;;
  *) echo "ACTION must be run, setup, stop or delete, not '$ACTION'" >&2; exit 2 ;;
esac
if [[ $# -lt 1 ]]; then
  echo "usage: launch/tpu_pod.sh SUBCOMMAND [ptuning arguments ...]" >&2
  exit 2
fi
create_if_missing
install
mkdir -p "$(dirname "$LOG_FILE")"
# The same command on every worker; the arguments are quoted for the remote shell. Each worker
# records its pid (for ACTION=stop) and writes its own log, run.log in REMOTE_DIR.
printf -v command '%q ' "$@"
cache_env=""
if [[ -n "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  printf -v cache_env 'JAX_COMPILATION_CACHE_DIR=%q ' "$JAX_COMPILATION_CACHE_DIR"
fi
echo "running on all workers of $TPU_NAME: ptuning $command (log: $LOG_FILE)"
on_all_workers "cd $REMOTE_DIR && { ${cache_env}.venv/bin/python -m ptuning $command > >(tee run.log) 2>&1 &
  pid=\$!; echo \$pid > ~/ptuning.pid; wait \$pid; }" 2>&1 | tee "$LOG_FILE"
