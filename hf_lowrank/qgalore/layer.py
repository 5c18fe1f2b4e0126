"""Quantized linear layers for Q-GaLore: weights as group-quantized codes, float gradients, stochastic rounding.

``QuantLinear`` replaces an ``nn.Linear``. Its weight lives in buffers (``codes``, ``scale``, ``minimum``) and is
dequantized on the fly in forward and again in backward (never kept). Its ``weight`` parameter is a gradient
carrier: it has the weight's shape and dtype, so autograd, DDP's reducer, gradient clipping and the optimizer see
an ordinary float gradient, but its values are meaningless and its storage is a view into one workspace that
every carrier of the model shares per device and dtype (``CarrierPool``: the largest targeted matrix, once). The
optimizer writes through the layer's update sink (``begin`` / ``commit``): dequantize, apply the whole update in
float, re-quantize with stochastic rounding.
"""
import contextlib
import copy
import weakref
import zlib

import torch
import torch.nn as nn

from ..optim.sinks import attach_update_sink, update_sink_of
from ..utils.quantization import dequantize_groups, packed_bytes, quantize_groups


_SEED_MIX = 0x9E3779B97F4A7C15


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends on the module name only (not on the order layers are visited)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62


class WeightQuantizer:
    """Quantizes one weight: ``bits``-bit codes per ``group_size`` values; stochastic rounding draws from a
    generator seeded by (layer seed, step), so the noise of step ``t`` is the same on every replica and after a
    resume, without any generator state to save."""

    def __init__(self, bits: int, group_size: int, stochastic: bool, seed: int):
        self.bits, self.group_size, self.stochastic, self.seed = bits, group_size, stochastic, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def quantize(self, value: torch.Tensor, step: int | None = None):
        """Codes of ``value``: round to nearest when ``step`` is None (initial quantization), else stochastic."""
        stochastic = self.stochastic and step is not None
        generator = None
        if stochastic and value.device.type != "meta":
            generator = self._generators.get(value.device)
            if generator is None:
                generator = self._generators[value.device] = torch.Generator(device=value.device)
            generator.manual_seed((self.seed ^ (step * _SEED_MIX)) % 2**63)
        return quantize_groups(value, self.bits, self.group_size, generator=generator, stochastic=stochastic)

    def dequantize(self, codes, scale, minimum, shape, dtype) -> torch.Tensor:
        return dequantize_groups(codes, scale, minimum, self.bits, self.group_size, shape, dtype)


class CarrierPool:
    """The workspaces that a model's gradient carriers view: one per (device, dtype), as large as the largest
    targeted matrix, freed when no layer of the model uses it any more."""

    def __init__(self, numel: int):
        self.numel = numel
        self._workspaces: dict[tuple, torch.Tensor] = {}
        self._users: dict[tuple, int] = {}

    def acquire(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        key = (torch.device(device), dtype)
        if key not in self._workspaces:
            self._workspaces[key] = torch.zeros(self.numel, dtype=dtype, device=device)
        self._users[key] = self._users.get(key, 0) + 1
        return self._workspaces[key][: int(torch.Size(shape).numel())].view(shape)

    def __deepcopy__(self, memo):
        return CarrierPool(self.numel)  # a copied model gets its own workspaces, acquired by its copied layers

    def release(self, carrier: torch.Tensor) -> None:
        key = (carrier.device, carrier.dtype)
        self._users[key] -= 1
        if not self._users[key]:
            del self._users[key], self._workspaces[key]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._workspaces.values())


class _QuantizedLinearFunction(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantized in forward and again in backward; ``dW`` goes to the carrier."""

    @staticmethod
    def forward(ctx, x, carrier, layer):
        ctx.layer = layer
        ctx.carrier_dtype = carrier.dtype
        ctx.save_for_backward(x, layer.codes, layer.scale, layer.minimum)  # a step before backward would raise
        return torch.nn.functional.linear(x, layer.dequantized_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, _, _, _ = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ layer.dequantized_weight(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])).to(ctx.carrier_dtype)
        return grad_x, grad_w, None


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored as group-quantized codes (see the module docstring).

    Build it with :meth:`from_linear`. ``dequantized_weight()`` is the current float weight.
    """

    holds_quantized_weight = True  # matched as a linear layer by target_modules, even where a wrapper replaced it

    def __init__(self, in_features: int, out_features: int, bias: bool, quantizer: WeightQuantizer,
                 pool: CarrierPool, device=None, dtype=torch.float32):
        super().__init__()
        if pool.numel < in_features * out_features:
            raise ValueError(f"CarrierPool of {pool.numel} elements is smaller than this {out_features}x{in_features} layer.")
        self.in_features, self.out_features, self.quantizer, self.pool = in_features, out_features, quantizer, pool
        groups = in_features * out_features // quantizer.group_size
        code_bytes = packed_bytes(in_features * out_features, quantizer.bits, quantizer.group_size)
        self.register_buffer("codes", torch.zeros(code_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(groups, dtype=torch.float32, device=device))
        self.register_buffer("minimum", torch.zeros(groups, dtype=torch.float32, device=device))
        shape = (out_features, in_features)
        self.weight = nn.Parameter(pool.acquire(shape, dtype, device or "cpu"))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        attach_update_sink(self.weight, self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizer: WeightQuantizer, pool: CarrierPool) -> "QuantLinear":
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quantizer, pool,
                    device=weight.device, dtype=weight.dtype)
        layer.weight.requires_grad_(weight.requires_grad)
        layer._store(*quantizer.quantize(weight.detach()))
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.quantizer.dequantize(self.codes, self.scale, self.minimum, self.weight_shape,
                                         dtype or self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if update_sink_of(self.weight) is not self:
            raise NotImplementedError(
                "This QuantLinear's weight parameter was replaced (FSDP2's fully_shard does this), so optimizer updates "
                "would never reach its INT8 codes. Q-GaLore layers train under DDP or in one process.")
        out = _QuantizedLinearFunction.apply(x, self.weight, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    # --- the update sink -----------------------------------------------------------------------------
    def begin(self) -> torch.Tensor:
        return self.dequantized_weight(torch.float32)

    def commit(self, value: torch.Tensor, ok: torch.Tensor, step: int) -> None:
        codes, scale, minimum = self.quantizer.quantize(value, step)
        keep = ok == 0  # a skipped step leaves the codes exactly as they were (decided on the device)
        self._store(torch.where(keep, self.codes, codes), torch.where(keep, self.scale, scale),
                    torch.where(keep, self.minimum, minimum))

    def _store(self, codes, scale, minimum) -> None:
        self.codes.copy_(codes)
        self.scale.copy_(scale)
        self.minimum.copy_(minimum)

    # --- device / dtype moves and checkpoints ---------------------------------------------------------
    @contextlib.contextmanager
    def _carrier_hidden(self):
        """Hide the carrier from ``nn.Module``'s parameter loops (they skip ``None`` entries, order is kept)."""
        carrier = self._parameters["weight"]
        self._parameters["weight"] = None
        try:
            yield carrier
        finally:
            self._parameters["weight"] = carrier

    def _apply(self, fn, recurse=True):
        """Moves buffers and bias with ``fn``; the carrier is re-pointed into the target workspace (never copied
        full size), and the quantization scales stay fp32."""
        with self._carrier_hidden() as carrier:
            probe = fn(torch.zeros(1, dtype=carrier.dtype, device=carrier.device))
            super()._apply(fn, recurse)
        if (probe.device, probe.dtype) != (carrier.device, carrier.dtype):
            self.pool.release(carrier)
            carrier.data = self.pool.acquire(self.weight_shape, probe.dtype, probe.device)
        for name in ("scale", "minimum"):
            self._buffers[name] = self._buffers[name].float()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        with self._carrier_hidden():  # the carrier holds no values: codes, scale and minimum are the weight
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            error_msgs.append(
                f"{prefix}weight: a dense weight was given to a QuantLinear; load dense checkpoints before "
                "prepare_model_for_qgalore, or load a Q-GaLore checkpoint (codes, scale, minimum) here.")
        with self._carrier_hidden():
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)

    def __deepcopy__(self, memo):
        """Copies buffers and bias; the copy's carrier views the copied model's pool (not a full-size clone)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        with self._carrier_hidden() as carrier:
            for key, value in self.__dict__.items():
                copied.__dict__[key] = copy.deepcopy(value, memo)
        weight = nn.Parameter(copied.pool.acquire(self.weight_shape, carrier.dtype, carrier.device),
                              requires_grad=carrier.requires_grad)
        copied._parameters["weight"] = weight
        attach_update_sink(weight, copied)
        return copied

    def extra_repr(self) -> str:
        q = self.quantizer
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={q.bits}, group_size={q.group_size}, stochastic_rounding={q.stochastic}")


class FakeQuantSink:
    """The fake-quant reference (``simulate=True``): an ``nn.Linear`` keeps fp32 weights, and after every update
    they are quantized (same quantizer, same noise as ``QuantLinear``) and dequantized in place."""

    def __init__(self, linear: nn.Linear, quantizer: WeightQuantizer):
        self.linear, self.quantizer = weakref.proxy(linear), quantizer
        self._round_trip(linear.weight.data, None, None)

    def begin(self) -> torch.Tensor:
        return self.linear.weight.data

    def commit(self, value: torch.Tensor, ok: torch.Tensor, step: int) -> None:
        self._round_trip(value, ok, step)

    def _round_trip(self, value, ok, step) -> None:
        quantized = self.quantizer.dequantize(*self.quantizer.quantize(value, step), value.shape, value.dtype)
        value.copy_(quantized if ok is None else torch.where(ok == 0, value, quantized))
