#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install rma_jax on every worker, run one command on all.
#
# A pod slice (e.g. v4-16 = 2 hosts x 4 chips, v5litepod-16 = 4 hosts x 4 chips) is one
# JAX program with one process per host: every worker runs the *same* `python -m rma_jax.main`
# command; jax.distributed.initialize() connects them (rma_jax.main calls it because this
# script exports JAX_COORDINATOR_ADDRESS = worker 0's internal IP; the number of processes
# and each process id come from the TPU metadata). Run from the repository root:
#
#   export TPU_NAME=rma-v4-16 ZONE=us-central2-b ACCELERATOR_TYPE=v4-16
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh install                      # this checkout, or REPO_URL=... to git clone
#   launch/tpu_vm.sh run --config=configs/voc.py --workdir=/mnt/shared/runs/voc \
#       --config.data.data_dir=/mnt/shared/tensorflow_datasets --config.optim.batch_size=64
#   launch/tpu_vm.sh delete
#
# Commands:
#   create              gcloud compute tpus tpu-vm create (SPOT=1 for a spot slice)
#   install             copy the code to every worker and pip install it with the extras
#                       RMA_JAX_EXTRAS (default tfds,gcs: TFDS data, gs:// paths) + jax[tpu]
#   run FLAGS...        python -m rma_jax.main FLAGS... on every worker (DETACH=1: in the
#                       background with nohup, log in ~/rma_run.log on each worker)
#   ssh COMMAND         run any shell command on every worker (e.g. 'tail ~/rma_run.log')
#   delete              delete the slice
# Environment:
#   TPU_NAME (required), ZONE (required), PROJECT (default: gcloud's current project),
#   ACCELERATOR_TYPE=v4-16, RUNTIME_VERSION=tpu-ubuntu2204-base (v5e: v2-alpha-tpuv5-lite),
#   REPO_URL (git URL to clone on the workers; default: copy this checkout with scp),
#   REMOTE_DIR=rma_jax, VENV=rma_venv (both relative to the workers' home), PORT=8476,
#   DRY_RUN=1 (print the gcloud commands instead of running them).
# The workdir must be one folder that every worker sees (orbax writes each checkpoint
# collectively, every host its own shards): a shared file system mounted on all workers.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
command=$1
shift

: "${TPU_NAME:?set TPU_NAME (the name of the TPU VM slice)}"
: "${ZONE:?set ZONE (e.g. us-central2-b for v4, us-west4-a for v5e)}"
accelerator_type=${ACCELERATOR_TYPE:-v4-16}
runtime_version=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
remote_dir=${REMOTE_DIR:-rma_jax}
venv=${VENV:-rma_venv}
port=${PORT:-8476}
dry_run=${DRY_RUN:-0}

gcloud_tpu=(gcloud compute tpus tpu-vm)
common=("--zone=${ZONE}")
if [[ -n ${PROJECT:-} ]]; then
  common+=("--project=${PROJECT}")
fi

run() {
  if [[ ${dry_run} == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {  # on_all_workers 'shell command'
  run "${gcloud_tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=all --command="$1"
}

coordinator_ip() {
  if [[ ${dry_run} == 1 ]]; then
    echo "WORKER0_IP"
    return
  fi
  "${gcloud_tpu[@]}" describe "${TPU_NAME}" "${common[@]}" \
      --format='value(networkEndpoints[0].ipAddress)'
}

case ${command} in
  create)
    extra=()
    if [[ ${SPOT:-0} == 1 ]]; then
      extra+=(--spot)
    fi
    run "${gcloud_tpu[@]}" create "${TPU_NAME}" "${common[@]}" \
        "--accelerator-type=${accelerator_type}" "--version=${runtime_version}" \
        "${extra[@]}"
    ;;

  install)
    if [[ -n ${REPO_URL:-} ]]; then
      fetch="if [ -d ${remote_dir}/.git ]; then git -C ${remote_dir} pull --ff-only; \
else git clone ${REPO_URL} ${remote_dir}; fi"
    else
      # Copy this checkout (without virtual environments, caches and git history).
      archive=$(mktemp --suffix=.tar.gz)
      trap 'rm -f "${archive}"' EXIT
      run tar -czf "${archive}" --exclude=.git --exclude=.venv --exclude='__pycache__' \
          --exclude='*.egg-info' -C "$(pwd)" .
      run "${gcloud_tpu[@]}" scp "${archive}" "${TPU_NAME}:rma_jax.tar.gz" "${common[@]}" \
          --worker=all
      fetch="mkdir -p ${remote_dir} && tar -xzf rma_jax.tar.gz -C ${remote_dir}"
    fi
    on_all_workers "set -e; ${fetch}; python3 -m venv ${venv}; \
${venv}/bin/pip install -q -U pip; ${venv}/bin/pip install -q -U 'jax[tpu]'; \
${venv}/bin/pip install -q -e \"${remote_dir}[${RMA_JAX_EXTRAS:-tfds,gcs}]\"; \
${venv}/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    ;;

  run)
    [[ $# -ge 1 ]] || usage
    printf -v flags '%q ' "$@"
    ip=$(coordinator_ip)
    main="cd ${remote_dir} && JAX_COORDINATOR_ADDRESS=${ip}:${port} \
\$HOME/${venv}/bin/python -m rma_jax.main ${flags}"
    if [[ ${DETACH:-0} == 1 ]]; then
      # The flags are quoted once (%q, for the bash that runs main); main itself travels
      # base64-encoded through the remote login shell into nohup's bash, so no second layer of
      # quoting is needed (one would break on %q's $'...' for newlines, quotes, control bytes).
      encoded=$(printf '%s' "${main}" | base64 | tr -d '\n')
      on_all_workers "nohup bash -c \"\$(echo ${encoded} | base64 -d)\" \
> ~/rma_run.log 2>&1 < /dev/null &"
    else
      on_all_workers "${main}"
    fi
    ;;

  ssh)
    [[ $# -ge 1 ]] || usage
    on_all_workers "$*"
    ;;

  delete)
    run "${gcloud_tpu[@]}" delete "${TPU_NAME}" "${common[@]}" --quiet
    ;;

  *)
    usage
    ;;
esac
