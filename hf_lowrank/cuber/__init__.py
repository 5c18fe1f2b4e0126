"""Continual learning without replay: GPM (Saha et al. 2021) and CUBER (Lin et al. 2022) as a Trainer."""
from .config import ContinualConfig
from .memory import RepresentationRecorder, SubspaceMemory, basis_from_covariance, energy_rank, extend_basis
from .metrics import AccuracyMatrix, average_accuracy, backward_transfer
from .projection import Correlation, GradientProjection, LayerProjection, ScaledWeightProjection, correlation_test
from .trainer import ContinualTrainer


__all__ = [
    "AccuracyMatrix",
    "ContinualConfig",
    "ContinualTrainer",
    "Correlation",
    "GradientProjection",
    "LayerProjection",
    "RepresentationRecorder",
    "ScaledWeightProjection",
    "SubspaceMemory",
    "average_accuracy",
    "backward_transfer",
    "basis_from_covariance",
    "correlation_test",
    "energy_rank",
    "extend_basis",
]
