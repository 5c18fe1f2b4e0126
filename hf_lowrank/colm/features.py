"""Zeroth-order per-example gradient features of one small parameter block (CoLM's selection features).

For a random direction z over the block, (l_i(theta + eps z) - l_i(theta - eps z)) / (2 eps) estimates the
directional derivative g_i . z, so g_i_hat = that scalar times z is an unbiased estimate of example i's gradient
restricted to the block; averaging over directions reduces its variance. Only forwards run (no activations kept).
With one direction every example's estimate is a multiple of the same z, so the selection sees one number per
example; :func:`backprop_features` gives the exact per-example gradients instead (the official code's
``masked_grad`` unit), at the cost of one backward through the layers above the block.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..owlore.outliers import find_blocks
from ..utils.targets import find_target_linears, is_conv1d, linear_types


# Value projections by architecture; GPT-2 fuses q, k and v in ``c_attn`` (its V is the last third of the outputs).
VALUE_PROJECTION = r"(.*\.)?(v_proj|value|c_attn)"


def _lora_types() -> tuple[type, ...]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return ()
    return (LoraLayer,)


@dataclass
class FeatureBlock:
    """The parameter the features are taken on, and the part of it (``index``) that is perturbed."""

    name: str
    parameter: nn.Parameter
    index: tuple
    block_index: Optional[int]  # the transformer block holding it (its earlier blocks can be reused), if any
    module: nn.Module  # the linear / Conv1D layer whose weight ``parameter`` is (LoRA: its ``lora_B`` layer)

    @property
    def view(self) -> torch.Tensor:
        return self.parameter.data[self.index]

    @property
    def dim(self) -> int:
        return self.view.numel()


def find_feature_block(model: nn.Module, feature_module: Optional[str] = None) -> FeatureBlock:
    """The weight of ``feature_module`` (a name or full-match regex that must match one linear / LoRA layer), or of
    the last block's value projection by default; a LoRA layer contributes its ``lora_B`` factor (LoRA A is random
    and B starts at zero, so B's gradient is the informative one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    types = linear_types() + _lora_types()
    try:
        _, blocks = find_blocks(base)
    except ValueError:
        blocks = None
    if feature_module is None:
        if blocks is None:
            raise ValueError(f"CoLMConfig.feature_module: {type(base).__name__} has no block list to take the last "
                             "block's value projection from; name the module (e.g. feature_module='model.layers.3."
                             "self_attn.v_proj').")
        candidates = find_target_linears(blocks[-1], VALUE_PROJECTION, module_types=types,
                                         parameter_name="CoLMConfig.feature_module (default: last block's v_proj)")
        target = candidates[-1][1]
        name = next(n for n, m in base.named_modules() if m is target)
        fused_qkv = True
    else:
        matches = find_target_linears(base, feature_module, module_types=types,
                                      parameter_name="CoLMConfig.feature_module")
        matches = [(n, m) for n, m in matches if not n.endswith(".base_layer")]
        if len(matches) != 1:
            raise ValueError(f"CoLMConfig.feature_module={feature_module!r} must match one module, but matches "
                             f"{len(matches)}: {[n for n, _ in matches][:6]}. Give the full name of one.")
        name, target = matches[0]
        fused_qkv = False
    if isinstance(target, _lora_types()):
        adapter = target.active_adapters[0]
        lora_b = target.lora_B[adapter]
        module, parameter, rows = lora_b, lora_b.weight, lora_b.weight.shape[0]  # out x r
        index = (slice(2 * rows // 3, rows), slice(None)) if fused_qkv and _is_fused(target.base_layer) else (
            slice(None), slice(None))
    else:
        module, parameter = target, target.weight
        if fused_qkv and _is_fused(target):
            cols = parameter.shape[1]  # Conv1D: in x 3h
            index = (slice(None), slice(2 * cols // 3, cols))
        else:
            index = (slice(None),) * parameter.dim()
    block_index = None
    if blocks is not None:
        block_index = next((i for i, block in enumerate(blocks) if any(m is target for m in block.modules())), None)
    return FeatureBlock(name=name, parameter=parameter, index=index, block_index=block_index, module=module)


def _is_fused(module: nn.Module) -> bool:
    return is_conv1d(module) and module.weight.shape[1] == 3 * module.weight.shape[0]


def directions(block: FeatureBlock, seed: int, key: tuple, count: int) -> torch.Tensor:
    """``count`` Gaussian directions for ``key`` (step, micro-batch), drawn on CPU from (seed, *key) so every
    device and a resumed run draw the same ones."""
    state = int(np.random.SeedSequence([seed, *key]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(state)
    z = torch.randn((count, block.dim), generator=generator, dtype=torch.float32)
    return z.to(device=block.parameter.device, dtype=block.parameter.dtype)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of next-token losses, number of label tokens)`` per example (labels shifted; -100 ignored; half
    precision logits are upcast to float32)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return losses.sum(dim=1), labels.ne(-100).sum(dim=1)


@contextlib.contextmanager
def _reused_prefix(blocks: nn.ModuleList, stop: int):
    """Inside: the first forward runs blocks[:stop] and records their outputs; every later forward reuses them."""
    outputs, hooks = {}, []
    for i in range(stop):
        hooks.append(blocks[i].register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out)))

    def reuse():
        for h in hooks:
            h.remove()
        for i in range(stop):
            blocks[i].forward = lambda *args, _out=outputs[i], **kwargs: _out

    try:
        yield reuse
    finally:
        for h in hooks:
            h.remove()
        for i in range(stop):
            blocks[i].__dict__.pop("forward", None)


@torch.no_grad()
def zeroth_order_features(model: nn.Module, block: FeatureBlock, inputs: dict, z: torch.Tensor, epsilon: float,
                          chunk_size: int, reuse_prefix: bool = True) -> torch.Tensor:
    """Per-example gradient estimates (n x block.dim) of the mean next-token loss of each example of ``inputs``
    (a batch with ``labels``), averaged over the rows of ``z``. Forwards run ``chunk_size`` examples at a time; the
    block's values are restored exactly afterwards."""
    labels = inputs["labels"]
    n = labels.shape[0]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    blocks = None
    if reuse_prefix and block.block_index:
        _, blocks = find_blocks(model.get_base_model() if hasattr(model, "get_base_model") else model)
    original = block.view.clone()
    slopes = torch.zeros((n, z.shape[0]), dtype=torch.promote_types(z.dtype, torch.float32), device=labels.device)
    try:
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = {k: (v[rows] if torch.is_tensor(v) and v.shape[:1] == (n,) else v)
                     for k, v in model_inputs.items()}
            chunk_labels = labels[rows]
            context = _reused_prefix(blocks, block.block_index) if blocks is not None else contextlib.nullcontext()
            with context as reuse:
                for k in range(z.shape[0]):
                    losses = []
                    for sign in (1.0, -1.0):
                        block.view.copy_(original + (sign * epsilon) * z[k].view_as(original))
                        logits = model(**chunk, use_cache=False).logits
                        total, count = per_example_loss(logits, chunk_labels)
                        losses.append(total / count.clamp_min(1))
                        if reuse is not None:
                            reuse()
                            reuse = None
                    slopes[rows, k] = (losses[0] - losses[1]) / (2 * epsilon)
    finally:
        block.view.copy_(original)
    return (slopes.to(z.dtype) @ z) / z.shape[0]


def backprop_features(model: nn.Module, block: FeatureBlock, inputs: dict, chunk_size: int) -> torch.Tensor:
    """Exact per-example gradients (n x block.dim) of the mean next-token loss of each example of ``inputs``, one
    forward and one backward per chunk of ``chunk_size`` examples. A layer's weight gradient is a sum over examples
    of (output gradient)^T x (input), so keeping the block layer's input and output gradient gives every example's
    gradient from a single backward. The forward runs without autograd up to the block layer, whose output becomes
    the leaf that is differentiated, so only the layers above it keep activations; no ``.grad`` is written."""
    labels = inputs["labels"]
    n = labels.shape[0]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    weight = block.module.weight
    transposed = is_conv1d(block.module)  # Conv1D computes x @ W (W is in x out); a linear x @ W^T (W out x in)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    captured = {}

    def capture(module, args, output):
        captured["input"] = args[0].detach()
        captured["output"] = output.detach().requires_grad_(True)
        torch.set_grad_enabled(True)  # the layers above record their graph; the no_grad block below restores
        return captured["output"]

    features = []
    handle = block.module.register_forward_hook(capture)
    try:
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = {k: (v[rows] if torch.is_tensor(v) and v.shape[:1] == (n,) else v)
                     for k, v in model_inputs.items()}
            with torch.no_grad():
                logits = model(**chunk, use_cache=False).logits
            if "output" not in captured:
                raise RuntimeError(f"CoLM: the feature layer {block.name} did not run in the model's forward.")
            total, count = per_example_loss(logits, labels[rows])
            out = captured["output"]
            (grad_out,) = torch.autograd.grad((total / count.clamp_min(1)).sum(), out)
            size = grad_out.shape[0]
            x = captured["input"].reshape(size, -1, captured["input"].shape[-1]).to(dtype)
            g = grad_out.reshape(size, -1, grad_out.shape[-1]).to(dtype)
            grads = torch.einsum("bti,bto->bio", x, g) if transposed else torch.einsum("bto,bti->boi", g, x)
            features.append(grads[(slice(None), *block.index)].reshape(size, -1))
            captured.clear()
    finally:
        handle.remove()
    return torch.cat(features).to(weight.dtype)
