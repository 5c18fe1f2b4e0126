"""Continual learning without replay: GPM (Saha et al. 2021), TRGP (Lin et al. 2022a) and CUBER (Lin et al. 2022b,
Algorithm 1) as one Trainer."""
from .config import ContinualConfig
from .memory import RepresentationRecorder, SubspaceMemory, basis_from_covariance, energy_rank, extend_basis
from .metrics import AccuracyMatrix, average_accuracy, backward_transfer
from .projection import (
    BackwardTransfer,
    Correlation,
    GradientProjection,
    LayerProjection,
    ScaledWeightProjection,
    assign_regimes,
    correlation_test,
    trust_region,
)
from .trainer import ContinualTrainer


__all__ = [
    "AccuracyMatrix",
    "BackwardTransfer",
    "ContinualConfig",
    "ContinualTrainer",
    "Correlation",
    "GradientProjection",
    "LayerProjection",
    "RepresentationRecorder",
    "ScaledWeightProjection",
    "SubspaceMemory",
    "assign_regimes",
    "average_accuracy",
    "backward_transfer",
    "basis_from_covariance",
    "correlation_test",
    "energy_rank",
    "extend_basis",
    "trust_region",
]
