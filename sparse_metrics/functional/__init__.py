"""The math of every loss term, as pure functions of tensors.

The metric classes in :mod:`sparse_metrics` accumulate what these functions compute; use these directly where no
state across batches or processes is wanted.
"""

from sparse_metrics.functional.auxiliary_k import auxiliary_k_loss
from sparse_metrics.functional.dead_features import dead_feature_mask, items_since_fired
from sparse_metrics.functional.explained_variance import explained_variance, fraction_of_variance_unexplained
from sparse_metrics.functional.feature_density import DENSITY_EPSILON, feature_density, mean_log10_feature_density
from sparse_metrics.functional.jumprelu_l0 import jumprelu_l0_loss
from sparse_metrics.functional.l0_norm import l0_norm
from sparse_metrics.functional.l1_absolute import l1_absolute_loss
from sparse_metrics.functional.l2_reconstruction import l2_reconstruction_loss
from sparse_metrics.functional.matryoshka import (
    matryoshka_prefix_errors,
    matryoshka_prefix_reconstructions,
    matryoshka_reconstruction_loss,
)
from sparse_metrics.functional.pre_activation import pre_activation_loss
from sparse_metrics.functional.sparsity import sparsity_loss
from sparse_metrics.functional.tanh_sparsity import tanh_sparsity_loss

__all__ = [
    "DENSITY_EPSILON",
    "auxiliary_k_loss",
    "dead_feature_mask",
    "explained_variance",
    "feature_density",
    "fraction_of_variance_unexplained",
    "items_since_fired",
    "jumprelu_l0_loss",
    "l0_norm",
    "l1_absolute_loss",
    "l2_reconstruction_loss",
    "matryoshka_prefix_errors",
    "matryoshka_prefix_reconstructions",
    "matryoshka_reconstruction_loss",
    "mean_log10_feature_density",
    "pre_activation_loss",
    "sparsity_loss",
    "tanh_sparsity_loss",
]
