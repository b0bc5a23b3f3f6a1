#!/usr/bin/env bash
# Runs one `ptuning` command as a multi-process JAX job on this machine: NUM_PROCESSES processes,
# each with DEVICES_PER_PROCESS fake CPU devices, joined through a coordinator on localhost. This
# is how multi-host code is exercised without a pod (tests/test_multihost.py uses it).
#
# Usage: launch/local_multiprocess.sh SUBCOMMAND [ptuning arguments ...]
#   e.g. NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh train \
#          --gin_file=runs/train.gin --gin_file=methods/prompt_tuning.gin \
#          --gin_file=partitioning/data2_model4.gin --gin.MODEL=tiny_t5_1_1 ...
#
# Variables (all optional):
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 4); the mesh spans all of them
#   COORDINATOR_PORT     localhost port of process 0's coordinator (default: a free port)
#   PY                   Python with ptuning installed (default .venv/bin/python, else python3)
#   LOG_DIR              if set, process K's output is also written to LOG_DIR/process_K.log
#
# Each process gets PTUNING_COORDINATOR, PTUNING_NUM_PROCESSES and PTUNING_PROCESS_ID (read by
# ptuning/distributed.py) and JAX_PLATFORMS=cpu. Output lines are prefixed "[process K] "; the
# launcher first prints "launched process K pid PID" for each. SIGTERM / SIGINT to the launcher
# is forwarded to every process (they finish their step, save and exit). If one process fails the
# others are stopped. Exit status: 0 if every process exited 0, else the first failure's status.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ -z "${COORDINATOR_PORT:-}" ]]; then
  COORDINATOR_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [[ $# -lt 1 ]]; then
  echo "usage: $0 SUBCOMMAND [ptuning arguments ...]" >&2
  exit 2
fi
if [[ -n "${LOG_DIR:-}" ]]; then mkdir -p "$LOG_DIR"; fi

# Other device-count flags (e.g. a test runner's) are replaced, not appended to.
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")
xla_flags="$xla_flags --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

pids=()
forward() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap forward TERM INT

for ((i = 0; i < NUM_PROCESSES; i++)); do
  log=/dev/null
  if [[ -n "${LOG_DIR:-}" ]]; then log="$LOG_DIR/process_$i.log"; fi
  PTUNING_COORDINATOR="127.0.0.1:$COORDINATOR_PORT" PTUNING_NUM_PROCESSES="$NUM_PROCESSES" \
    PTUNING_PROCESS_ID="$i" JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" PYTHONUNBUFFERED=1 \
    "$PY" -m ptuning "$@" > >(tee "$log" | sed -u "s/^/[process $i] /") 2>&1 &
  pids+=("$!")
  echo "launched process $i pid $!"
done

status=0
live=("${pids[@]}")
while ((${#live[@]} > 0)); do
  rc=0
  ended=
  wait -n -p ended "${live[@]}" || rc=$?
  if [[ -z "$ended" ]]; then
    continue  # `wait` was interrupted by a trapped signal; no process ended
  fi
  still=()
  for pid in "${live[@]}"; do [[ "$pid" == "$ended" ]] || still+=("$pid"); done
  live=("${still[@]}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "process pid $ended exited with status $rc; stopping the others" >&2
    forward
  fi
done
wait  # the output filters
exit "$status"
