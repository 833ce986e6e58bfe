"""Loads rma_jax/configs/coco_baseline.py, the shipped config (see there)."""

from rma_jax.configs.coco_baseline import get_config  # noqa: F401
