"""Shims of the configs shipped in ``rma_jax/configs`` (see there), so that
``--config=configs/NAME.py`` names a file from the repository root."""
