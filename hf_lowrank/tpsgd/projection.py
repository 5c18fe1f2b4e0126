"""Seeded random projections P_i, the local targets f(y* P_i) and the local-loss gradients.

The local losses are differentiated in closed form (no autograd graph for the loss), so a layer's graph holds
only what the layer itself saves. Every loss is summed over a layer's units and averaged over the batch:

    mse            0.5 * ||h - t||^2       dL/dh = h - t                (the delta rule)
    l1             ||h - t||_1             dL/dh = sign(h - t)
    bce            BCE(sigmoid(h), t)      dL/dh = sigmoid(h) - t
    cross_entropy  CE(softmax(h), t)       dL/dh = softmax(h) sum(t) - t  (softmax over all units of the layer)

The task loss of the output layer is differentiated the same way (`task_loss_and_grad`), so the last layer too
keeps only its input for the weight gradient.

DRTP instead uses dL/dh = y* B, summed (not averaged) over the batch, exactly as its reference code.
"""
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def projection_matrix(
    distribution: str, scale: float, seed: int, layer: int, num_labels: int, width: int, step: Optional[int] = None
) -> torch.Tensor:
    """P of hidden layer `layer` as a (num_labels, width) fp32 matrix, a pure function of its arguments.

    `step` selects the matrix P_{layer,step} of one time step (recurrent_projection='per_step'); its generator
    seed comes from numpy's SeedSequence over (seed, layer, step), so no two (layer, step) pairs share one.
    """
    if step is None:
        generator_seed = seed * 1_000_003 + layer
    else:
        mask = (1 << 64) - 1
        entropy = [seed & mask, layer, step]
        generator_seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
    generator = torch.Generator().manual_seed(generator_seed)
    matrix = torch.empty(num_labels, width)
    if distribution == "gaussian":
        matrix.normal_(0.0, scale, generator=generator)
    elif distribution == "uniform":
        matrix.uniform_(-scale, scale, generator=generator)
    else:  # kaiming_uniform, as DRTP: bound sqrt(6 / fan_in) with fan_in = width
        bound = scale * math.sqrt(6.0 / width)
        matrix.uniform_(-bound, bound, generator=generator)
    return matrix


def squash(name: str, x: torch.Tensor) -> torch.Tensor:
    """Target squashing on (batch, units)."""
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    return x


def local_loss_and_grad(loss: str, h: torch.Tensor, target: torch.Tensor):
    """(mean-over-batch loss, its gradient w.r.t. h) for flat (batch, units) `h` and `target`."""
    batch = h.shape[0]
    if loss == "mse":
        diff = h - target
        return 0.5 * diff.square().sum() / batch, diff / batch
    if loss == "l1":
        diff = h - target
        return diff.abs().sum() / batch, diff.sign() / batch
    if loss == "bce":
        value = F.binary_cross_entropy_with_logits(h, target, reduction="sum") / batch
        return value, (torch.sigmoid(h) - target) / batch
    log_probs = torch.log_softmax(h, dim=-1)
    value = -(target * log_probs).sum() / batch
    return value, (log_probs.exp() * target.sum(-1, keepdim=True) - target) / batch


def task_loss(name: str, logits: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Loss of the output layer with torch's mean reductions (autograd path: evaluation and the BP baseline)."""
    if name == "cross_entropy":
        return F.cross_entropy(logits, one_hot)
    if name == "bce":
        return F.binary_cross_entropy_with_logits(logits, one_hot)
    return F.mse_loss(logits, one_hot)


def task_loss_and_grad(name: str, logits: torch.Tensor, one_hot: torch.Tensor):
    """(`task_loss`, its gradient w.r.t. the logits) in closed form: the per-unit sums of `local_loss_and_grad`
    rescaled to torch's means (bce and mse average over classes too, and F.mse_loss has no 1/2)."""
    value, grad = local_loss_and_grad(name, logits, one_hot)
    factor = {"cross_entropy": 1.0, "bce": 1.0 / logits.shape[1], "mse": 2.0 / logits.shape[1]}[name]
    return value * factor, grad * factor


def one_hot_labels(labels: torch.Tensor, num_labels: int, dtype: torch.dtype) -> torch.Tensor:
    """Class indices (batch,) or one-hot/soft labels (batch, num_labels) as a float (batch, num_labels) tensor."""
    if labels.dim() == 2 and labels.is_floating_point():
        if labels.shape[1] != num_labels:
            raise ValueError(
                f"labels have {labels.shape[1]} columns but the projection matrices P have {num_labels} rows "
                f"(num_labels={num_labels}); pass class indices or one-hot labels of width {num_labels}."
            )
        return labels.to(dtype)
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(
            "labels must be integer class indices of shape (batch,) or one-hot floats of shape "
            f"(batch, {num_labels}); got {tuple(labels.shape)} {labels.dtype}."
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(
            f"labels contain class {int(labels.max() if labels.max() >= num_labels else labels.min())} but the "
            f"projection matrices P have {num_labels} rows (num_labels={num_labels}); set TpSGDConfig.num_labels / "
            "the output layer to the number of classes."
        )
    return F.one_hot(labels.long(), num_labels).to(dtype)
