"""Test-session setup, before JAX is imported anywhere.

* 4 forced host CPU devices, so multi-device sharding is exercised in-process, as in Flax's
  own examples; XLA:CPU's backend optimisation level 0 (``TEST_OPTIMIZATION_LEVEL``) in
  every process of the session. Processes the tests start add ``$RMA_TEST_XLA_FLAGS`` to
  their own XLA_FLAGS (a user's flags, e.g. ``--xla_cpu_max_isa=AVX2``, reach them too).
* One XLA compilation cache for the whole session (``JAX_COMPILATION_CACHE_DIR``): the
  pytest-xdist workers and every ``python -m rma_jax.main`` the tests start inherit it, so a
  step that many tests compile (the tiny demo model's train and evaluation steps) is compiled
  once per session and loaded from disk afterwards. A cache hit is the same executable, so
  no verdict depends on it. The folder is new for each session (a CI run starts cold) and is
  removed at its end.
* An expensive thing several tests only read (a trained workdir, a multi-process run) is
  built once per session, by whichever xdist worker asks first, and reused by the other
  (``shared_once``).
* The slow tests (marked ``slow``) start first, so that no long test is left to finish alone
  on one worker at the end of the session.
"""

import fcntl
import json
import os
import shutil
import tempfile

import pytest


def _xla_flags() -> tuple[str, str]:
  """(the in-process XLA_FLAGS, the flags every process the tests start adds to its own):
  the user's XLA flags (e.g. --xla_cpu_max_isa=AVX2), XLA:CPU's backend optimisation level 0
  unless the user sets one, and 4 forced host devices in-process unless the user sets a
  count."""
  user = os.environ.get("XLA_FLAGS", "").split()
  count = [f for f in user if f.startswith("--xla_force_host_platform_device_count")]
  extra = [f for f in user if f not in count]
  if not any(f.startswith("--xla_backend_optimization_level") for f in extra):
    extra.append(f"--xla_backend_optimization_level={TEST_OPTIMIZATION_LEVEL}")
  return " ".join((count or ["--xla_force_host_platform_device_count=4"]) + extra), " ".join(
      extra)


TEST_OPTIMIZATION_LEVEL = 0
"""XLA:CPU's backend (LLVM) optimisation level of the tests' programs. The suite's time is
mostly compilation of small programs: level 0 compiles the same HLO with fewer passes, in 40 %
less CPU time, and what the tests check (behaviour, numbers to a tolerance, equalities
between runs of one session) does not depend on it. Runs as users compile them, at the
default level: the CPU kernels' fixture (tests/test_kernels.py) and the benchmarks."""

os.environ["XLA_FLAGS"], os.environ["RMA_TEST_XLA_FLAGS"] = _xla_flags()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:  # the controller sets it before the workers start; they inherit it
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rma_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def shared_once(tmp_path_factory, worker_id):
  """``get(name, build) -> result``: ``build(folder)`` runs once per session, in a folder
  shared by the xdist workers, whichever asks first; the others wait for it (a file lock)
  and get its JSON-able result. Tests read the folder, or copy it to change it."""
  root = tmp_path_factory.getbasetemp()
  root = root.parent if worker_id != "master" else root

  def get(name, build):
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        done = root / f"{name}.json"
        if not done.exists():  # not built, or a build that failed: (re)build
          shutil.rmtree(folder, ignore_errors=True)
          folder.mkdir()
          done.write_text(json.dumps(build(folder)))
        return json.loads(done.read_text())
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
  return get


SHARED = ("finished_run", "stage1", "runs", "exported", "resnet_run")
"""The module fixtures built by ``shared_once``: the first test of each starts early, the
others run last, when the thing is built (not waiting on it while the other worker builds)."""


def pytest_collection_modifyitems(config, items):
  # Stable: the slow tests first, then the rest as collected, then the further users of a
  # shared fixture.
  seen = set()

  def tier(item):
    shared = set(getattr(item, "fixturenames", ())) & set(SHARED)
    if shared and shared <= seen:
      return 2
    seen.update(shared)
    return 0 if shared or item.get_closest_marker("slow") else 1
  tiers = {item.nodeid: tier(item) for item in items}
  items.sort(key=lambda item: tiers[item.nodeid])


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the controller only
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
