"""The metric classes (state and validation); the math they accumulate lives in :mod:`sparse_metrics.functional`."""

from sparse_metrics.metrics._base import DerivedOutput
from sparse_metrics.metrics.auxiliary_k import AuxiliaryKLoss
from sparse_metrics.metrics.dead_features import DeadFeatures
from sparse_metrics.metrics.explained_variance import ExplainedVariance, FractionOfVarianceUnexplained
from sparse_metrics.metrics.feature_density import FeatureDensity
from sparse_metrics.metrics.jumprelu_l0 import JumpReLUL0Loss
from sparse_metrics.metrics.l0_norm import L0NormMetric
from sparse_metrics.metrics.l1_absolute import L1AbsoluteLoss
from sparse_metrics.metrics.l2_reconstruction import L2ReconstructionLoss
from sparse_metrics.metrics.matryoshka import MatryoshkaReconstructionLoss
from sparse_metrics.metrics.pre_activation import PreActivationLoss
from sparse_metrics.metrics.sparsity import SparsityLoss
from sparse_metrics.metrics.tanh_sparsity import TanhSparsityLoss
from sparse_metrics.metrics.total_loss import TotalLoss

__all__ = [
    "AuxiliaryKLoss",
    "DeadFeatures",
    "DerivedOutput",
    "ExplainedVariance",
    "FeatureDensity",
    "FractionOfVarianceUnexplained",
    "JumpReLUL0Loss",
    "L0NormMetric",
    "L1AbsoluteLoss",
    "L2ReconstructionLoss",
    "MatryoshkaReconstructionLoss",
    "PreActivationLoss",
    "SparsityLoss",
    "TanhSparsityLoss",
    "TotalLoss",
]
