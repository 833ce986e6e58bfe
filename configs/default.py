"""Loads rma_jax/configs/default.py, the shipped config (see there)."""

from rma_jax.configs.default import get_config  # noqa: F401
