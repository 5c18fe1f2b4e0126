"""Inner optimizers: the update rule run on the (projected) gradient of each parameter.

An inner optimizer owns the per-parameter moment tensors in ``optimizer.state[p]`` and turns gradients into
steps. It never sees projectors: the outer :class:`~hf_lowrank.optim.ProjectedOptimizer` hands it low-rank
gradients for projected parameters and full gradients for plain ones, and projects the returned steps back.

Contract of :meth:`InnerOptimizer.update`: it returns, for each gradient, the step ``u`` such that the (low-rank)
parameter moves by ``-u`` (learning rate and bias correction included). Callers must not modify the returned
tensors in place (Adafactor returns its first-moment buffer itself).

Every update takes ``oks``: one 0-dim float tensor per gradient on its device, 1.0 to apply the step and 0.0 to
skip it (a non-finite gradient, already zeroed by the caller). A skipped step leaves moments and the returned step
exactly unchanged / zero, decided on the device: no host synchronisation. The bias-correction counter
``moment_step`` is a host int and counts attempted steps (the host cannot know which were skipped without a sync).
"""
import math

import torch

from ..utils import require


class InnerOptimizer:
    """Base class. ``options`` lists group keys (with defaults) this rule reads besides lr/betas/eps."""

    name: str = ""
    options: dict = {}
    supports_rotate: bool = True

    def init_state(self, state: dict, shape: torch.Size, like: torch.Tensor, group: dict) -> None:
        """Allocate zeroed moments for a (low-rank) gradient of ``shape`` on ``like``'s device and dtype."""
        raise NotImplementedError

    def update(self, states: list[dict], grads: list[torch.Tensor], group: dict, oks: list[torch.Tensor]
               ) -> list[torch.Tensor]:
        raise NotImplementedError

    def apply(self, params: list[torch.Tensor], states: list[dict], grads: list[torch.Tensor], group: dict,
              oks: list[torch.Tensor]) -> None:
        """Update full-size (plain) parameters in place; subclasses may fuse this (no step tensors)."""
        torch._foreach_sub_(params, self.update(states, grads, group, oks))

    def moments(self, state: dict, group: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(first, second)`` moments, for the ``rotate`` policy."""
        raise NotImplementedError

    def set_moments(self, state: dict, first: torch.Tensor, second: torch.Tensor, group: dict) -> None:
        raise NotImplementedError


class AdamW(InnerOptimizer):
    """AdamW exactly as galore-torch (and the paper) writes it: ``eps`` is added to ``sqrt(v)`` and the bias
    correction is folded into the step size, ``lr * sqrt(1 - b2^t) / (1 - b1^t)``. Batched with foreach ops."""

    name = "adamw"

    def init_state(self, state, shape, like, group):
        state["moment_step"] = 0
        state["exp_avg"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=like.dtype, device=like.device)

    @staticmethod
    def _step_sizes(states, group, oks):
        """``ok * lr * sqrt(1 - b2^t) / (1 - b1^t)`` per state, as device tensors (0 for a skipped step)."""
        beta1, beta2 = group["betas"]
        sizes = []
        for state in states:
            state["moment_step"] += 1
            t = state["moment_step"]
            sizes.append(group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
        return torch._foreach_mul(oks, sizes)

    @staticmethod
    def _masked_betas(group, oks):
        """Per-state ``(1 - b1, b2)`` weights, ``(0, 1)`` where the step is skipped (moments stay bit-identical)."""
        beta1, beta2 = group["betas"]
        return torch._foreach_mul(oks, 1.0 - beta1), [torch.where(ok > 0, beta2, 1.0) for ok in oks]

    def _advance(self, states, grads, group, oks):
        """Update the moments; return ``(exp_avgs, (sqrt(v) + eps) / step size)``."""
        beta2 = group["betas"][1]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]  # e.g. after a load
        first_weights, second_decays = self._masked_betas(group, oks)
        torch._foreach_lerp_(exp_avgs, grads, first_weights)
        torch._foreach_mul_(exp_avg_sqs, second_decays)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)  # skipped gradients are zero
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_div_(denoms, self._step_sizes(states, group, oks))  # a skipped step: inf, so m / inf = 0
        return exp_avgs, denoms

    def update(self, states, grads, group, oks):
        exp_avgs, denoms = self._advance(states, grads, group, oks)
        return torch._foreach_div(exp_avgs, denoms)

    def apply(self, params, states, grads, group, oks):
        exp_avgs, denoms = self._advance(states, grads, group, oks)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-1.0)

    def moments(self, state, group):
        return state["exp_avg"], state["exp_avg_sq"]

    def set_moments(self, state, first, second, group):
        state["exp_avg"], state["exp_avg_sq"] = first, second


class AdamW8bit(AdamW):
    """AdamW with block-wise 8-bit moments (Dettmers et al. 2022) via ``bitsandbytes.functional``.

    Each moment is a ``uint8`` tensor of dynamic-tree codes plus one fp32 ``absmax`` per ``block_size`` values
    (signed code for the first moment, unsigned for the second, as bitsandbytes' 8-bit Adam). A step dequantizes,
    runs the fp32 AdamW math above and re-quantizes. Tensors with fewer than ``min_8bit_size`` elements keep
    fp32 moments, as bitsandbytes does.
    """

    name = "adamw8bit"
    options = {"min_8bit_size": 4096, "block_size": 256}
    _QUANTIZED_KEYS = ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax")
    _codes: dict = {}

    @staticmethod
    def _functional():
        require("bitsandbytes", "bnb", "8-bit optimizer state (inner='adamw8bit', e.g. mode 'galore_8bit')")
        import bitsandbytes.functional as bnb_functional

        return bnb_functional

    def _code(self, signed: bool, device) -> torch.Tensor:
        key = (signed, str(device))
        if key not in self._codes:
            self._codes[key] = self._functional().create_dynamic_map(signed=signed).to(device)
        return self._codes[key]

    def init_state(self, state, shape, like, group):
        if math.prod(shape) < group["min_8bit_size"]:
            return super().init_state(state, shape, like, group)
        state["moment_step"] = 0
        blocks = -(-math.prod(shape) // group["block_size"])
        for key in ("exp_avg", "exp_avg_sq"):
            # All-zero codes with a zero absmax dequantize to exactly 0.
            state[key] = torch.zeros(shape, dtype=torch.uint8, device=like.device)
            state[key + "_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)

    def _dequantize(self, state, key, signed, block_size):
        return self._functional().dequantize_blockwise(
            state[key], absmax=state[key + "_absmax"], code=self._code(signed, state[key].device), blocksize=block_size
        )

    def _quantize(self, state, key, value, signed, block_size):
        codes, quant_state = self._functional().quantize_blockwise(
            value, code=self._code(signed, value.device), blocksize=block_size
        )
        state[key], state[key + "_absmax"] = codes, quant_state.absmax

    apply = InnerOptimizer.apply  # 8-bit moments are not foreach-able: no fused path

    def update(self, states, grads, group, oks):
        quantized = [i for i, s in enumerate(states) if "exp_avg_absmax" in s]
        if not quantized:
            return super().update(states, grads, group, oks)
        plain = [i for i in range(len(states)) if "exp_avg_absmax" not in states[i]]
        steps: list = [None] * len(states)
        if plain:
            pick = lambda items: [items[i] for i in plain]  # noqa: E731
            for i, step in zip(plain, super().update(pick(states), pick(grads), group, pick(oks))):
                steps[i] = step
        beta2 = group["betas"][1]
        q_oks = [oks[i] for i in quantized]
        sizes = self._step_sizes([states[i] for i in quantized], group, q_oks)
        first_weights, second_decays = self._masked_betas(group, q_oks)
        for i, step_size, first_weight, second_decay in zip(quantized, sizes, first_weights, second_decays):
            state, grad = states[i], grads[i].float()
            exp_avg, exp_avg_sq = self.moments(state, group)
            exp_avg.lerp_(grad, first_weight)
            exp_avg_sq.mul_(second_decay).addcmul_(grad, grad, value=1.0 - beta2)
            steps[i] = (exp_avg / exp_avg_sq.sqrt().add_(group["eps"])).mul_(step_size).to(grads[i].dtype)
            previous = {key: state[key] for key in self._QUANTIZED_KEYS}
            self.set_moments(state, exp_avg, exp_avg_sq, group)
            for key, value in previous.items():  # re-quantising unchanged moments may move absmax by an ulp
                state[key] = torch.where(oks[i] > 0, state[key], value)
        return steps

    def moments(self, state, group):
        if "exp_avg_absmax" not in state:
            return super().moments(state, group)
        block_size = group["block_size"]
        return (self._dequantize(state, "exp_avg", True, block_size),
                self._dequantize(state, "exp_avg_sq", False, block_size))

    def set_moments(self, state, first, second, group):
        if "exp_avg_absmax" not in state:
            return super().set_moments(state, first, second, group)
        block_size = group["block_size"]
        self._quantize(state, "exp_avg", first, True, block_size)
        self._quantize(state, "exp_avg_sq", second.clamp_min(0), False, block_size)


class Adafactor(InnerOptimizer):
    """Adafactor (Shazeer & Stern 2018) as transformers' ``Adafactor(relative_step=False, scale_parameter=False,
    warmup_init=False)``: factored second moment (row and column means) for matrices, ``beta2_t = 1 - t^decay_rate``,
    update RMS clipped at ``clip_threshold``, optional first moment when ``beta1`` is set. ``betas``/``eps`` of the
    group are not used; ``adafactor_eps`` is transformers' ``eps[0]``."""

    name = "adafactor"
    options = {"beta1": None, "decay_rate": -0.8, "clip_threshold": 1.0, "adafactor_eps": 1e-30}
    supports_rotate = False

    def init_state(self, state, shape, like, group):
        state["moment_step"] = 0
        zeros = dict(dtype=torch.float32, device=like.device)
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **zeros)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **zeros)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, **zeros)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def update(self, states, grads, group, oks):
        return [self._update_one(state, grad, group, ok) for state, grad, ok in zip(states, grads, oks)]

    @staticmethod
    def _update_one(state, grad, group, ok):
        state["moment_step"] += 1
        beta2t = 1.0 - state["moment_step"] ** group["decay_rate"]
        decay, weight = torch.where(ok > 0, beta2t, 1.0), ok * (1.0 - beta2t)  # a skipped step keeps the moments
        grad32 = grad.float()
        update = grad32.square().add_(group["adafactor_eps"])
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(decay).add_(update.mean(dim=-1).mul_(weight))
            col.mul_(decay).add_(update.mean(dim=-2).mul_(weight))
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = row_factor * col.unsqueeze(-2).rsqrt() * grad32
        else:
            state["exp_avg_sq"].mul_(decay).add_(update.mul_(weight))
            update = state["exp_avg_sq"].rsqrt() * grad32
        rms = update.norm(2) / (update.numel() ** 0.5)
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0)).mul_(ok * group["lr"])
        if group["beta1"] is not None:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(torch.where(ok > 0, group["beta1"], 1.0)).add_(update.to(exp_avg.dtype),
                                                                         alpha=1.0 - group["beta1"])
            return exp_avg * ok
        return update.to(grad.dtype)


INNER_OPTIMIZERS: dict[str, InnerOptimizer] = {cls.name: cls() for cls in (AdamW, AdamW8bit, Adafactor)}

# Every inner-specific group key with its default (one flat namespace; names do not collide).
INNER_OPTION_DEFAULTS: dict = {k: v for inner in INNER_OPTIMIZERS.values() for k, v in inner.options.items()}


def get_inner(name: str) -> InnerOptimizer:
    if name not in INNER_OPTIMIZERS:
        raise ValueError(f"Unknown inner optimizer `inner`={name!r}; available: {sorted(INNER_OPTIMIZERS)}.")
    return INNER_OPTIMIZERS[name]
