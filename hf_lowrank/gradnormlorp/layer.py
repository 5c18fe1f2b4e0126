"""Magnitude/direction reparameterisation of an ``nn.Linear`` with torch's own weight-norm parametrization.

``torch.nn.utils.parametrizations.weight_norm(linear, dim=0)`` computes ``W = g ⊙ V/‖V‖`` with one norm per
output row and initialises ``g = ‖W‖_row``, ``V = W``, so the layer's output is unchanged at first.
"""
import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm


MAGNITUDE, DIRECTION = "parametrizations.weight.original0", "parametrizations.weight.original1"


def reparameterize(linear: nn.Linear) -> nn.Linear:
    """Turn ``linear.weight`` into magnitude ``m`` (out×1) × direction ``V/‖V‖`` (out×in), in place."""
    if is_reparameterized(linear):
        raise ValueError("This layer is already reparameterised by GradNormLoRP.")
    return weight_norm(linear, name="weight", dim=0)


def is_reparameterized(linear: nn.Module) -> bool:
    return parametrize.is_parametrized(linear, "weight")


def magnitude_and_direction(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    weights = linear.parametrizations.weight
    return weights.original0, weights.original1


def merge(linear: nn.Linear) -> nn.Linear:
    """Write ``m ⊙ V/‖V‖`` back into a plain dense ``weight`` and drop the parametrization, in place."""
    parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    return linear
