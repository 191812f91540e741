"""sparse_metrics: SAE training losses and metrics as distributed-reducible ``torchmetrics`` metrics."""

from importlib.metadata import PackageNotFoundError, version

from sparse_metrics import presets
from sparse_metrics._sharding import gather_features
from sparse_metrics.collection import SparseAutoencoderLoss
from sparse_metrics.metrics import (
    AuxiliaryKLoss,
    BatchTopKThreshold,
    DeadFeatures,
    DerivedOutput,
    ExplainedVariance,
    FeatureDensity,
    FractionOfVarianceUnexplained,
    JumpReLUL0Loss,
    L0NormMetric,
    L1AbsoluteLoss,
    L2ReconstructionLoss,
    MatryoshkaReconstructionLoss,
    NormalizedMSE,
    PreActivationLoss,
    ReconstructionCosineSimilarity,
    ReconstructionNormRatio,
    RelativeReconstructionBias,
    SparsityLoss,
    TanhSparsityLoss,
    TotalLoss,
)

try:
    __version__ = version("sparse_metrics")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AuxiliaryKLoss",
    "BatchTopKThreshold",
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
    "NormalizedMSE",
    "PreActivationLoss",
    "ReconstructionCosineSimilarity",
    "ReconstructionNormRatio",
    "RelativeReconstructionBias",
    "SparseAutoencoderLoss",
    "SparsityLoss",
    "TanhSparsityLoss",
    "TotalLoss",
    "__version__",
    "gather_features",
    "presets",
]
