"""Test-session setup, before JAX is imported anywhere.

* 4 forced host CPU devices, so multi-device sharding is exercised in-process, as in Flax's
  own examples.
* One XLA compilation cache for the whole session (``JAX_COMPILATION_CACHE_DIR``): the
  pytest-xdist workers and every ``python -m rma_jax.main`` the tests start inherit it, so a
  step that many tests compile (the tiny demo model's train and evaluation steps) is compiled
  once per session and loaded from disk afterwards. A cache hit is the same executable, so
  no verdict depends on it. The folder is new for each session (a CI run starts cold) and is
  removed at its end.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:  # the controller sets it before the workers start; they inherit it
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rma_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the controller only
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
