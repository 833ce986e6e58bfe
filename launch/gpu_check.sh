#!/usr/bin/env bash
# One prepared check on a lent GPU (< 8 minutes including compilation); see launch/gpu_check.py.
#   bash launch/gpu_check.sh            # on the GPU machine, from the repository root
#   bash launch/gpu_check.sh --smoke    # anywhere: a seconds-long run on the default device
# Needs JAX (with CUDA), Flax, Optax, NumPy and ml_collections; no TensorFlow, no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
# Let XLA take most of the GPU memory up front (the batch search probes the limit).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export TF_CPP_MIN_LOG_LEVEL=2
exec timeout 470 python launch/gpu_check.py "$@"
