"""The math of every loss term, as pure functions of tensors.

The metric classes in :mod:`sparse_metrics` accumulate what these functions compute; use these directly where no
state across batches or processes is wanted.
"""

from sparse_metrics.functional.l0_norm import l0_norm
from sparse_metrics.functional.l1_absolute import l1_absolute_loss
from sparse_metrics.functional.l2_reconstruction import l2_reconstruction_loss
from sparse_metrics.functional.matryoshka import (
    matryoshka_prefix_errors,
    matryoshka_prefix_reconstructions,
    matryoshka_reconstruction_loss,
)
from sparse_metrics.functional.sparsity import sparsity_loss

__all__ = [
    "l0_norm",
    "l1_absolute_loss",
    "l2_reconstruction_loss",
    "matryoshka_prefix_errors",
    "matryoshka_prefix_reconstructions",
    "matryoshka_reconstruction_loss",
    "sparsity_loss",
]
