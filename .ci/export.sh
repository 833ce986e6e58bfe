#!/usr/bin/env bash
# CI, third leg: the .[export] extra (jax2onnx, onnxruntime) in its own environment,
# .ci-venv-export/ (Python 3.11), and tests/test_export.py there: the ONNX artifacts in ONNX
# Runtime and examples/serve_onnx.py, which the first leg skips; and a ResNet run's export
# (tests/test_resnet.py), whose ONNX leg the first leg skips too. Its own environment because
# jax2onnx 0.17 pins orbax-checkpoint < 0.11.37: the first leg keeps the Orbax users get.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python3 -m venv .ci-venv-export
# shellcheck disable=SC1091  # made just above
. .ci-venv-export/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[export]" pytest pytest-xdist
python -c "import importlib.metadata as m; print('export leg: ' + ', '.join(f'{p} {m.version(p)}' for p in ('jax', 'jax2onnx', 'onnxruntime', 'orbax-checkpoint')))"
JAX_PLATFORMS=cpu python -m pytest -q -n 2 -p no:cacheprovider tests/test_export.py \
    tests/test_resnet.py::test_a_resnet_run_exports_and_the_artifact_equals_the_model
echo "export.sh: passed in $((SECONDS - start)) s"
