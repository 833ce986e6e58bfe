"""Loads rma_jax/configs/voc.py, the shipped config (see there)."""

from rma_jax.configs.voc import get_config  # noqa: F401
