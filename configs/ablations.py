"""Loads rma_jax/configs/ablations.py, the shipped config (see there)."""

from rma_jax.configs.ablations import get_config  # noqa: F401
