"""The metric classes (state and validation); the math they accumulate lives in :mod:`sparse_metrics.functional`."""

from sparse_metrics.metrics.l0_norm import L0NormMetric
from sparse_metrics.metrics.l1_absolute import L1AbsoluteLoss
from sparse_metrics.metrics.l2_reconstruction import L2ReconstructionLoss
from sparse_metrics.metrics.matryoshka import MatryoshkaReconstructionLoss
from sparse_metrics.metrics.sparsity import SparsityLoss

__all__ = [
    "L0NormMetric",
    "L1AbsoluteLoss",
    "L2ReconstructionLoss",
    "MatryoshkaReconstructionLoss",
    "SparsityLoss",
]
