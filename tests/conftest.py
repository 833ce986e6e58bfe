"""Test-session setup: 4 forced host CPU devices (before JAX is imported) so multi-device
sharding is exercised in-process, as in Flax's own examples."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
