"""Test-session setup, before JAX is imported anywhere.

* 4 forced host CPU devices, so multi-device sharding is exercised in-process, as in Flax's
  own examples; XLA:CPU compiling faster (``TEST_COMPILE_FLAGS``: backend optimisation level
  0, the older fusion emitters) in every process of the session. Processes the tests start
  add ``$RMA_TEST_XLA_FLAGS`` to their own XLA_FLAGS (a user's flags, e.g.
  ``--xla_cpu_max_isa=AVX2``, reach them too).
* One XLA compilation cache for the whole session (``JAX_COMPILATION_CACHE_DIR``): the
  pytest-xdist workers and every ``python -m rma_jax.main`` the tests start inherit it, so a
  step that many tests compile (the tiny demo model's train and evaluation steps) is compiled
  once per session and loaded from disk afterwards. A cache hit is the same executable, so
  no verdict depends on it. The folder is new for each session (a CI run starts cold) and is
  removed at its end.
* An expensive thing several tests only read (a trained workdir, a multi-process run) is
  built once per session, by whichever xdist worker asks first, and reused by the other
  (``shared_once``).
* The slow tests (marked ``slow``) start first, handed to the workers one or two at a time,
  so that no long test is left to finish alone on one worker at the end of the session.
"""

import fcntl
import json
import os
import shutil
import tempfile

import pytest


def _xla_flags() -> tuple[str, str]:
  """(the in-process XLA_FLAGS, the flags every process the tests start adds to its own):
  the user's XLA flags (e.g. --xla_cpu_max_isa=AVX2), each of ``TEST_COMPILE_FLAGS`` that
  the user does not set and this XLA knows, and 4 forced host devices in-process unless the
  user sets a count."""
  user = os.environ.get("XLA_FLAGS", "").split()
  count = [f for f in user if f.startswith("--xla_force_host_platform_device_count")]
  extra = [f for f in user if f not in count]
  for flag in TEST_COMPILE_FLAGS:
    name = flag.split("=")[0]
    if not any(f.split("=")[0] == name for f in extra) and _xla_knows(flag):
      extra.append(flag)
  return " ".join((count or ["--xla_force_host_platform_device_count=4"]) + extra), " ".join(
      extra)


TEST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
"""XLA:CPU flags of the tests' programs. The suite's time is mostly compilation of small
programs, and both flags compile the same HLO in less CPU time: backend (LLVM) optimisation
level 0 runs fewer passes (40 % less), and XLA:CPU's older fusion emitters (its default before
the new ones) emit the many small fusions of a train step faster than the new ones. What the
tests check (behaviour, numbers to a tolerance, equalities between runs of one session) does
not depend on them. Runs as users compile them, with XLA's defaults: the CPU kernels' fixture
(tests/test_kernels.py) and the benchmarks."""

_KNOWN_FLAGS = "RMA_TEST_XLA_KNOWN_FLAGS"
"""The test flags this XLA was found to know, for the xdist workers (they inherit it)."""


def _xla_knows(flag: str) -> bool:
  """Whether XLA takes ``flag`` (it stops at an unknown one: a flag a later XLA drops must
  not stop the suite). Asked once per session, in a process of its own."""
  if flag == "--xla_backend_optimization_level=0":  # a flag of every XLA
    return True
  if _KNOWN_FLAGS not in os.environ:
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    known = [f for f in TEST_COMPILE_FLAGS[1:] if subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
        env=dict(os.environ, XLA_FLAGS=f, JAX_PLATFORMS="cpu")).returncode == 0]
    os.environ[_KNOWN_FLAGS] = " ".join(known)
  return flag in os.environ[_KNOWN_FLAGS].split()


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


def _shared_fixtures(item) -> set:
  """The fixtures of ``item`` (its own and those they use) that ``shared_once`` builds: the
  first test of each starts early, the others run last, when the thing is built (not waiting
  on it while the other worker builds). Their definitions, not their names: another module
  may have a fixture of the same name (tests/test_fuse.py's per-test ``runs``)."""
  info = getattr(item, "_fixtureinfo", None)
  if info is None:
    return set()
  return {defs[-1] for defs in info.name2fixturedefs.values()
          if defs and "shared_once" in defs[-1].argnames}


def pytest_configure(config):
  # pytest-xdist's load scheduling hands each worker its first quarter of the tests at once:
  # one worker would get every slow test (they come first) and the other the short ones,
  # and the session would wait for the first at its end. At most 2 at a time instead: a free
  # worker takes the next slow test.
  if not hasattr(config, "workerinput") and getattr(config.option, "maxschedchunk", 0) is None:
    config.option.maxschedchunk = 2


def pytest_collection_modifyitems(config, items):
  # Stable: the slow tests first, then the rest as collected, then the further users of a
  # shared fixture.
  seen = set()

  def tier(item):
    shared = _shared_fixtures(item)
    if shared and shared <= seen:
      return 2
    seen.update(shared)
    return 0 if shared or item.get_closest_marker("slow") else 1
  tiers = {item.nodeid: tier(item) for item in items}
  items.sort(key=lambda item: tiers[item.nodeid])


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the controller only
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
