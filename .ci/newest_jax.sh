#!/usr/bin/env bash
# CI, second leg: the Python and JAX that accelerator users have. Python 3.12 and the newest
# jax, jaxlib, flax, optax and orbax-checkpoint from PyPI (no TensorFlow, no torch) in
# .ci-venv312/, then the paper's core tests and the bfloat16 ones, and one tiny CLI run
# through every stage (stage 1, stage 2, evaluation, report) and predict. 2-3 minutes on a
# 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

# Prints the path of a Python 3.12 that runs: python3.12 on PATH, else the newest pyenv 3.12.x.
# Each candidate is run, because a pyenv shim for python3.12 exists (and fails) when 3.12 is
# installed but not selected.
find_python312() {
  local candidates=() root cand
  if command -v python3.12 >/dev/null 2>&1; then
    candidates+=("$(command -v python3.12)")
  fi
  root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
  if [[ -d "$root/versions" ]]; then
    # Newest patch release first (sort -V); the glob may match nothing.
    while IFS= read -r cand; do
      candidates+=("$cand")
    done < <(compgen -G "$root/versions/3.12*/bin/python" | sort -rV || true)
  fi
  # (The +-form: an empty array is no error under set -u in bash < 4.4.)
  for cand in ${candidates[@]+"${candidates[@]}"}; do
    if "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

if ! python312="$(find_python312)"; then
  echo "newest_jax.sh: no Python 3.12 found (neither python3.12 on PATH nor pyenv's versions/3.12*/bin/python)" >&2
  exit 1
fi

# Reuse the venv only if it was made with Python 3.12 (otherwise start it again).
if ! .ci-venv312/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    >/dev/null 2>&1; then
  "$python312" -m venv --clear .ci-venv312
fi
# shellcheck disable=SC1091  # made just above
. .ci-venv312/bin/activate
python -m pip install -q --upgrade pip
# -U upgrades the packages named here (pip's default strategy), so each run takes the newest
# JAX stack even in a reused venv; the project's other dependencies only as it needs them.
python -m pip install -q -U -e . pytest pytest-xdist jax jaxlib flax optax orbax-checkpoint

python - <<'EOF'
import importlib.metadata
import sys

print(f"python: {sys.version.split()[0]}")
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
  print(f"{name}: {importlib.metadata.version(name)}")
for name in ("tensorflow", "tensorflow-cpu", "torch"):  # this leg runs without them
  try:
    print(f"{name}: {importlib.metadata.version(name)} (unexpected in this leg)")
  except importlib.metadata.PackageNotFoundError:
    pass
EOF

# The paper's core (README), two pytest-xdist workers, and bfloat16 (the dtype accelerators
# train in), which XLA:CPU of jaxlib 0.12.1 computes as NaN without rma_jax.conv._activate's
# workaround.
python -m pytest -q -n 2 -p no:cacheprovider tests/test_ops.py tests/test_losses.py \
    tests/test_metrics.py tests/test_models.py tests/test_precision.py

# One tiny run through both stages, the evaluation and the report, then predict on one image.
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
export JAX_PLATFORMS=cpu
python -m rma_jax.main --config=configs/demo.py:tiny --workdir="$workdir/wd"
if [[ ! -f "$workdir/wd/report/report.md" ]]; then
  echo "newest_jax.sh: the tiny run wrote no $workdir/wd/report/report.md" >&2
  exit 1
fi
mkdir "$workdir/inputs"
python -c 'import sys; from PIL import Image; Image.new("RGB", (96, 96), "gray").save(sys.argv[1])' \
    "$workdir/inputs/gray.png"
python -m rma_jax.main --config=configs/demo.py:tiny --workdir="$workdir/wd" --mode=predict \
    --inputs="$workdir/inputs"

echo "newest_jax.sh: passed in $((SECONDS - start)) s"
