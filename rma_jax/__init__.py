"""rma_jax: recurrent memorized attention for multi-label image recognition, in JAX/Flax.

Reimplementation of Wang et al., "Multi-label Image Recognition by Recurrently Discovering
Attentional Regions", ICCV 2017. Submodules: ``models``, ``ops``, ``losses``, ``metrics``,
``train``, ``evaluate``; the input pipeline lives in ``rma_jax.data``.
"""

__version__ = "0.1.0"
