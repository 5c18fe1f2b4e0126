"""OWL's layerwise outlier distribution (Yin et al., 2024), which OwLore samples blocks by.

For every linear layer of a block, the score of weight ``W_ij`` is ``A_ij = |W_ij| * ||X_j||_2``, with ``X_j`` the
j-th input channel over all calibration tokens (collected with forward hooks, as Wanda/OWL do); the block's
outlier ratio is the share of its scores above ``M`` times the mean score of the block.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn


# Where transformers keeps the block list, per architecture family (first match wins).
BLOCK_PATHS = ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
               "encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "model.encoder.layer")


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(path, block list)`` of a transformers model (a PEFT wrapper is looked through); ``blocks`` names the
    attribute path (e.g. ``"model.layers"``) for architectures not in ``BLOCK_PATHS``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    paths = (blocks,) if blocks is not None else BLOCK_PATHS
    for path in paths:
        found = base
        for attribute in path.split("."):
            found = getattr(found, attribute, None)
            if found is None:
                break
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    if blocks is not None:
        raise ValueError(f"`blocks`={blocks!r} does not name a non-empty nn.ModuleList of {type(base).__name__}.")
    raise ValueError(
        f"Could not find the transformer blocks of {type(base).__name__} (looked at {list(BLOCK_PATHS)}); pass "
        "`blocks=` with the attribute path of its block list, e.g. blocks='model.layers'."
    )


def _linear_weights(block: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """``(module, weight as out x in)`` of every linear layer of ``block`` (nn.Linear and GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    out = []
    for module in block.modules():
        if isinstance(module, nn.Linear):
            out.append((module, module.weight))
        elif isinstance(module, Conv1D):  # stored in x out
            out.append((module, module.weight.T))
    return out


@torch.no_grad()
def compute_outlier_ratios(model: nn.Module, calibration_batches, M: float = 5.0, blocks: str | None = None
                           ) -> list[float]:
    """Outlier ratio of every block (fractions in [0, 1]) on ``calibration_batches`` (dicts of model inputs, or
    input-id tensors). ``M`` is OWL's outlier multiple (OwLore's shipped LLaMA-2 ratios use 13)."""
    if not isinstance(M, (int, float)) or isinstance(M, bool) or M <= 0:
        raise ValueError(f"`M` (outlier multiple) must be a number > 0, got {M!r}.")
    _, block_list = find_blocks(model, blocks)
    layers = [_linear_weights(block) for block in block_list]
    if not any(layers):
        raise ValueError("compute_outlier_ratios: the blocks hold no nn.Linear / Conv1D layer to score.")
    sums = {}

    def record(module, inputs):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        sums[module] = sums.get(module, 0) + x.square().sum(0)

    handles = [module.register_forward_pre_hook(record) for block in layers for module, _ in block]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for batch in calibration_batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("compute_outlier_ratios: `calibration_batches` is empty.")
    ratios = []
    for block in layers:
        scores = [weight.detach().abs().float() * sums[module].sqrt().to(weight.device)[None, :]
                  for module, weight in block if module in sums]
        total = sum(s.numel() for s in scores)
        mean = sum(s.sum() for s in scores) / total
        outliers = sum((s > M * mean).sum() for s in scores)
        ratios.append(float(outliers / total))
    return ratios


def save_ratios(path, ratios: list[float], *, model_name: str, M: float) -> Path:
    """Write ``{"model": ..., "M": ..., "ratios": [...]}`` as JSON."""
    path = Path(path)
    path.write_text(json.dumps({"model": model_name, "M": M, "ratios": list(map(float, ratios))}, indent=1) + "\n")
    return path


def load_ratios(path) -> dict:
    """The ``{"model", "M", "ratios"}`` record written by :func:`save_ratios`."""
    record = json.loads(Path(path).read_text())
    missing = {"model", "M", "ratios"} - set(record)
    if missing:
        raise ValueError(f"{path}: not an outlier-ratio file (missing {sorted(missing)}); write it with save_ratios.")
    return record
