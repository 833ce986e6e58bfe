"""The CPU kernels: a matmul kernel gradient and Winograd / im2col forwards for VGG's 3x3
convolutions (``conv``, ``winograd``), the evaluation-only forms of the parameters they use
(``forms``), and the building blocks that put them into a model (``modules``)."""

from rma_jax.kernels.cpu.forms import COLLECTION, evaluation_forms
from rma_jax.kernels.cpu.modules import Dense, VGGBlock

__all__ = ["COLLECTION", "Dense", "VGGBlock", "evaluation_forms"]
