"""Loads rma_jax/configs/demo.py, the shipped config (see there)."""

from rma_jax.configs.demo import get_config  # noqa: F401
