"""rma_jax: recurrent memorized attention for multi-label image recognition, in JAX/Flax.

Reimplementation of Wang et al., "Multi-label Image Recognition by Recurrently Discovering
Attentional Regions", ICCV 2017. The paper's core: ``models``, ``ops`` (the sampler),
``losses``, ``metrics`` and ``regions``; training: ``steps`` (the jitted step),
``optimizer``, ``train`` (the loop), ``run`` (the two-stage job); evaluation: ``views``,
``evaluate``, ``report``; after training: ``load_run`` (``trained``), ``export``; the input
pipeline lives in ``rma_jax.data``. docs/architecture.md maps every module.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
  # ``rma_jax.load_run`` without importing the models and Orbax with the package itself.
  if name == "load_run":
    from rma_jax.trained import load_run  # pylint: disable=g-import-not-at-top
    return load_run
  raise AttributeError(f"module 'rma_jax' has no attribute {name!r}")
