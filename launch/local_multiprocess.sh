#!/usr/bin/env bash
# Starts N JAX processes on this machine, connected like the hosts of a pod slice.
#
# Each process runs the same `python -m rma_jax.main` command with
# --coordinator_address=localhost:PORT --num_processes=N --process_id=i on the CPU backend
# with DEVICES_PER_PROCESS forced host devices, so the multi-host code paths (per-process
# data shards, global arrays, cross-process all-reduce, collective orbax checkpoints, process-0
# logging) run without a cluster. Run from the repository root:
#
#   launch/local_multiprocess.sh 2 /tmp/rma_mp --config.max_steps=20 --config.stage1.num_epochs=0
#
# Usage: launch/local_multiprocess.sh NUM_PROCESSES WORKDIR [extra rma_jax.main flags...]
# Environment (all optional):
#   CONFIG=configs/demo.py     config file passed as --config
#   PORT=12355                 coordinator port on localhost (process 0 listens on it)
#   DEVICES_PER_PROCESS=2      forced host CPU devices per process
#   PYTHON=python              interpreter (e.g. .venv/bin/python)
#   LOG_DIR=WORKDIR/logs       one log file per process: process_<i>.log
#   TIMEOUT=0                  seconds before every process is killed (0 = no limit)
#   DRY_RUN=1                  print the commands instead of running them
# Exit status: 0 when every process exits 0, else the first non-zero status.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2
  exit 2
fi

num_processes=$1
workdir=$2
shift 2
if ! [[ ${num_processes} =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES must be a positive integer, got '${num_processes}'" >&2
  exit 2
fi

config=${CONFIG:-configs/demo.py}
port=${PORT:-12355}
devices_per_process=${DEVICES_PER_PROCESS:-2}
python=${PYTHON:-python}
log_dir=${LOG_DIR:-${workdir}/logs}
timeout_s=${TIMEOUT:-0}
dry_run=${DRY_RUN:-0}

pids=()
cleanup() {
  # Only the processes this script started: a crashed peer leaves the others waiting on a
  # collective until the coordinator's heartbeat timeout, so stop them at once.
  local pid
  for pid in "${pids[@]}"; do
    kill "${pid}" 2>/dev/null || true
  done
}

if [[ ${dry_run} != 1 ]]; then
  mkdir -p "${log_dir}"
  trap cleanup INT TERM
fi

for ((i = 0; i < num_processes; i++)); do
  cmd=(env JAX_PLATFORMS=cpu
       "XLA_FLAGS=--xla_force_host_platform_device_count=${devices_per_process}"
       "${python}" -m rma_jax.main
       "--config=${config}" "--workdir=${workdir}"
       "--coordinator_address=localhost:${port}"
       "--num_processes=${num_processes}" "--process_id=${i}"
       "$@")
  if [[ ${timeout_s} != 0 ]]; then
    cmd=(timeout "${timeout_s}" "${cmd[@]}")
  fi
  if [[ ${dry_run} == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    continue
  fi
  "${cmd[@]}" >"${log_dir}/process_${i}.log" 2>&1 &
  pids+=("$!")
  echo "process ${i}: pid $!, log ${log_dir}/process_${i}.log"
done

[[ ${dry_run} == 1 ]] && exit 0

status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "process ${i}: done"
  else
    rc=$?
    echo "process ${i}: exit status ${rc}; last lines of its log:" >&2
    tail -n 20 "${log_dir}/process_${i}.log" >&2 || true
    if [[ ${status} == 0 ]]; then
      status=${rc}
      cleanup
    fi
  fi
done
exit "${status}"
