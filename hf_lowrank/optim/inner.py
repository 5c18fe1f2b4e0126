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
from torch._guards import active_fake_mode
from torch.optim.optimizer import _get_fused_kernels_supported_devices
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

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
    correction is folded into the step size, ``lr * sqrt(1 - b2^t) / (1 - b1^t)``.

    Runs torch's fused AdamW kernel (``torch._fused_adamw_``: one kernel per device, dtype and step count,
    grouped with ``torch.utils._foreach_utils``) wherever torch has one, else the same math in foreach ops.
    torch's kernel adds ``eps`` to ``sqrt(v / (1 - b2^t))``; passing ``eps / sqrt(1 - b2^t)`` makes it the formula
    above. A low-rank step is written into a zeroed buffer with ``-lr`` (the kernel's ``p -= lr * m / denom``
    then leaves the step itself); a skipped step is the kernel's ``found_inf``, so moments stay bit-identical.
    """

    name = "adamw"
    fused_devices = tuple(_get_fused_kernels_supported_devices())

    def init_state(self, state, shape, like, group):
        state["moment_step"] = 0
        state["exp_avg"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=like.dtype, device=like.device)

    @staticmethod
    def _step_sizes(states, group, oks):
        """``ok * lr * sqrt(1 - b2^t) / (1 - b1^t)`` per state, as device tensors (0 for a skipped step)."""
        beta1, beta2 = group["betas"]
        sizes = [group["lr"] * math.sqrt(1.0 - beta2 ** s["moment_step"]) / (1.0 - beta1 ** s["moment_step"])
                 for s in states]
        return torch._foreach_mul(oks, sizes)

    @staticmethod
    def _masked_betas(group, oks):
        """Per-state ``(1 - b1, b2)`` weights, ``(0, 1)`` where the step is skipped (moments stay bit-identical)."""
        beta1, beta2 = group["betas"]
        return torch._foreach_mul(oks, 1.0 - beta1), [torch.where(ok > 0, beta2, 1.0) for ok in oks]

    def _foreach(self, params, states, grads, group, oks, sign):
        """The update in foreach ops (devices without torch's fused kernel): ``params += sign * step``."""
        beta2 = group["betas"][1]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        first_weights, second_decays = self._masked_betas(group, oks)
        torch._foreach_lerp_(exp_avgs, grads, first_weights)
        torch._foreach_mul_(exp_avg_sqs, second_decays)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)  # skipped gradients are zero
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_div_(denoms, self._step_sizes(states, group, oks))  # a skipped step: inf, so m / inf = 0
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=sign)

    def _fused(self, params, states, grads, group, oks, sign):
        """``params += sign * step`` through torch's fused AdamW, one call per (device, dtype, step, flag)."""
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        by_device = _group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs], with_indices=True)
        for (device, _), (_, indices) in by_device.items():
            calls: dict = {}
            for i in indices:  # one call per step count (the bias correction) and skip flag
                calls.setdefault((states[i]["moment_step"], id(oks[i])), []).append(i)
            for (t, _), members in calls.items():
                pick = lambda items: [items[i] for i in members]  # noqa: E731
                self._fused_call(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), t, group,
                                 oks[members[0]], sign)

    @staticmethod
    def _fused_call(params, grads, exp_avgs, exp_avg_sqs, t, group, ok, sign):
        """One ``torch._fused_adamw_`` call for tensors on one device and dtype, at step count ``t``, sharing the
        skip flag ``ok``: ``params += sign * step``."""
        beta1, beta2 = group["betas"]
        step = torch.full((), float(t), dtype=torch.float32, device=params[0].device)
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [step] * len(params), lr=-sign * group["lr"],
                            beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"] / math.sqrt(1.0 - beta2**t),
                            amsgrad=False, maximize=False, found_inf=1.0 - ok)

    def _run(self, params, states, grads, group, oks, sign):
        grads = [g if g.dtype == s["exp_avg"].dtype else g.to(s["exp_avg"].dtype)  # e.g. after a load
                 for g, s in zip(grads, states)]
        for state in states:
            state["moment_step"] += 1
        fused = [i for i, p in enumerate(params) if p.device.type in self.fused_devices]
        other = [i for i in range(len(params)) if i not in set(fused)]
        for members, run in ((fused, self._fused), (other, self._foreach)):
            if members:
                pick = lambda items: [items[i] for i in members]  # noqa: E731
                run(pick(params), pick(states), pick(grads), group, pick(oks), sign)

    def update(self, states, grads, group, oks):
        steps = [torch.zeros(g.shape, dtype=_step_dtype(s, g), device=g.device) for s, g in zip(states, grads)]
        self._run(steps, states, grads, group, oks, sign=1.0)
        return steps

    def apply(self, params, states, grads, group, oks):
        """In place where the parameter has its moments' dtype; otherwise (fp32 moments loaded into a bf16
        model) through a step buffer, since the kernels take one dtype per call."""
        mixed = [i for i, (p, s) in enumerate(zip(params, states))
                 if s["exp_avg"].dtype.is_floating_point and p.dtype != s["exp_avg"].dtype]
        same = [i for i in range(len(params)) if i not in set(mixed)]
        for members, in_place in ((same, True), (mixed, False)):
            if members:
                pick = lambda items: [items[i] for i in members]  # noqa: E731
                if in_place:
                    self._run(pick(params), pick(states), pick(grads), group, pick(oks), sign=-1.0)
                else:
                    steps = self.update(pick(states), pick(grads), group, pick(oks))
                    torch._foreach_sub_(pick(params), [s.to(p.dtype) for s, p in zip(steps, pick(params))])

    def moments(self, state, group):
        return state["exp_avg"], state["exp_avg_sq"]

    def set_moments(self, state, first, second, group):
        state["exp_avg"], state["exp_avg_sq"] = first, second


class AdamW8bit(AdamW):
    """AdamW with block-wise 8-bit moments (Dettmers et al. 2022) through bitsandbytes.

    Each moment is a ``uint8`` tensor of dynamic-tree codes plus one fp32 ``absmax`` per 256 values (signed code
    for the first moment, unsigned for the second, as bitsandbytes' 8-bit Adam). On the devices where
    bitsandbytes has a fused 8-bit update kernel (``fused_update_devices``) a step is one
    ``bitsandbytes.functional.optimizer_update_8bit_blockwise`` call per tensor, in place on the codes and absmax,
    with no fp32 copy of the moments; as for torch's kernel, ``eps / sqrt(1 - b2^t)`` and ``-lr`` on a zeroed
    buffer give galore-torch's formula and the step itself, and a skipped step restores the saved codes and absmax.
    Elsewhere (CPU) bitsandbytes' update is a Python kernel that dequantizes both moments, the gradient and the
    parameter of the whole tensor into fp32; here the same dequantize, AdamW, requantize runs one slice of
    ``SLICE_SIZE`` values at a time (bitsandbytes' dequantizer, :class:`AdamW`'s fused math, and
    :meth:`_quantize_slice`, which gives bitsandbytes' CPU codes bit for bit), so the fp32 copies are slice-sized,
    and a skipped step keeps the old codes slice by slice. Tensors with fewer than ``min_8bit_size`` elements keep
    fp32 moments, as bitsandbytes does.
    """

    name = "adamw8bit"
    options = {"min_8bit_size": 4096, "block_size": 256}
    BLOCK_SIZE = 256  # bitsandbytes' fused 8-bit optimizer kernels work on blocks of 256
    # Values per dequantized slice off the fused devices (a whole number of blocks): 1 MB per fp32 copy, large
    # enough that the per-call overhead of bitsandbytes' CPU kernels stays small (2^16: a 1.16x slower optimizer step).
    SLICE_SIZE = 1 << 18
    fused_update_devices = ("cuda", "xpu")  # device types with bitsandbytes' fused 8-bit update kernel
    _QUANTIZED_KEYS = ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax")
    LUT_BINS = 65536  # bitsandbytes' CPU quantizer: [-1, 1] in uniform bins, each mapped to its nearest code
    _codes: dict = {}
    _luts: dict = {}

    @staticmethod
    def _functional():
        require("bitsandbytes", "bnb", "8-bit optimizer state (inner='adamw8bit', e.g. mode 'galore_8bit')")
        import bitsandbytes.functional as bnb_functional

        return bnb_functional

    def _code(self, signed: bool, device) -> torch.Tensor:
        if active_fake_mode() is not None:  # memory estimation on fake tensors: only the map's size matters
            return torch.empty(256, dtype=torch.float32, device=device)
        key = (signed, str(device))
        if key not in self._codes:
            self._codes[key] = self._functional().create_dynamic_map(signed=signed).to(device)
        return self._codes[key]

    def build_tables(self, device) -> None:
        """Build the constant tables of ``device`` now (both code maps and both bin tables: 2 x 64 KB, kept for the
        process, as bitsandbytes keeps its own) rather than at the first 8-bit step, e.g. before measuring memory."""
        for signed in (True, False):
            self._lut(signed, device)

    def _lut(self, signed: bool, device) -> torch.Tensor:
        """Code index of each of ``LUT_BINS`` uniform bins of [-1, 1] (the first code whose midpoint with the next
        is not below the bin's left edge), as bitsandbytes' CPU kernel builds it, so lookups give its codes."""
        if active_fake_mode() is not None:  # memory estimation: a process constant, not step memory; any size serves
            return torch.empty(1, dtype=torch.uint8, device=device)
        key = (signed, str(device))
        if key not in self._luts:
            code = self._code(signed, device)
            midpoints = 0.5 * (code[:-1] + code[1:])
            edges = -1.0 + 2.0 * torch.arange(self.LUT_BINS, dtype=torch.float32, device=device) / (self.LUT_BINS - 1)
            self._luts[key] = torch.searchsorted(midpoints, edges).to(torch.uint8)
        return self._luts[key]

    def _quantize_slice(self, value: torch.Tensor, lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, absmax)`` of a 1-D fp32 slice in blocks of ``BLOCK_SIZE``, overwriting ``value`` (a dequantized
        temporary): bitsandbytes' CPU quantizer (scale by 1/absmax, clamp, index of the bin, code of the bin; an
        all-zero block gets code 0) written in torch ops. Its codes equal those of
        ``torch.ops.bitsandbytes.quantize_blockwise`` bit for bit (tested), about 3x faster on x86, where
        bitsandbytes' wheel calls ``std::max`` and ``std::clamp`` out of line for every value (seen with perf)."""
        full = value.numel() - value.numel() % self.BLOCK_SIZE
        parts = [value[:full].view(-1, self.BLOCK_SIZE)] if full else []
        if full < value.numel():
            parts.append(value[full:].view(1, -1))
        codes, absmax = [], []
        for blocks in parts:
            block_absmax = blocks.abs().amax(1, keepdim=True)  # 20x faster than vector_norm(ord=inf) on CPU
            nonempty = block_absmax > 0
            scaled = blocks.mul_(torch.where(nonempty, block_absmax.reciprocal(), 0.0))
            # ((x + 1) * 0.5) * (bins - 1) + 0.5, truncated: the bin bitsandbytes picks (x 0.5 is exact, so one
            # multiply by 0.5 * (bins - 1) rounds as its two do). An all-zero block adds 0 instead of 1: bin 0, code 0.
            bins = scaled.clamp_(-1.0, 1.0).add_(nonempty.float()).mul_(0.5 * (self.LUT_BINS - 1)).add_(0.5)
            # index_select takes int32 indices as they are (indexing with [] would first copy them to int64)
            codes.append(torch.index_select(lut, 0, bins.view(-1).to(torch.int32)))
            absmax.append(block_absmax.view(-1))
        if len(parts) == 1:
            return codes[0], absmax[0]
        return torch.cat(codes), torch.cat(absmax)

    def init_state(self, state, shape, like, group):
        if math.prod(shape) < group["min_8bit_size"]:
            return super().init_state(state, shape, like, group)
        state["moment_step"] = 0
        blocks = -(-math.prod(shape) // self.BLOCK_SIZE)
        for key in ("exp_avg", "exp_avg_sq"):
            # All-zero codes with a zero absmax dequantize to exactly 0.
            state[key] = torch.zeros(shape, dtype=torch.uint8, device=like.device)
            state[key + "_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)

    def _run(self, params, states, grads, group, oks, sign):
        quantized = [i for i, s in enumerate(states) if "exp_avg_absmax" in s]
        plain = [i for i in range(len(states)) if i not in set(quantized)]
        if plain:
            pick = lambda items: [items[i] for i in plain]  # noqa: E731
            super()._run(pick(params), pick(states), pick(grads), group, pick(oks), sign)
        for i in quantized:
            states[i]["moment_step"] += 1
            fused = params[i].device.type in self.fused_update_devices
            (self._fused_8bit if fused else self._sliced_8bit)(params[i], states[i], grads[i], group, oks[i], sign)

    def _fused_8bit(self, param, state, grad, group, ok, sign):
        """One bitsandbytes fused update of the whole tensor, in place on its codes and absmax."""
        beta1, beta2 = group["betas"]
        t = state["moment_step"]
        saved = [state[key].clone() for key in self._QUANTIZED_KEYS]
        # the step is written into a zeroed buffer (update: the caller's; apply: one per plain tensor, so a
        # skipped step leaves the parameter untouched)
        target = param if sign > 0 else torch.zeros_like(param)
        grad = grad if grad.dtype == target.dtype else grad.to(target.dtype)
        lr = float(group["lr"])  # bitsandbytes takes a host number (a tensor lr is read once per step here)
        self._functional().optimizer_update_8bit_blockwise(
            "adam", grad, target, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, 0.0, 0.0,
            group["eps"] / math.sqrt(1.0 - beta2**t), t, -lr, self._code(True, grad.device),
            self._code(False, grad.device), state["exp_avg_absmax"], state["exp_avg_sq_absmax"],
            weight_decay=0.0)
        for key, previous in zip(self._QUANTIZED_KEYS, saved):
            torch.where(ok > 0, state[key], previous, out=state[key])
        if sign > 0:
            target.mul_(ok)
        else:
            param.add_(target.mul_(ok), alpha=-1.0)

    def _sliced_8bit(self, param, state, grad, group, ok, sign):
        """Dequantize, AdamW and requantize, slice by slice; a skipped step keeps the old codes and absmax. The
        slice math is one fused AdamW call (:meth:`AdamW._fused_call`, which leaves a skipped slice unchanged) where
        torch has the kernel, else :meth:`AdamW._foreach`."""
        flat_param, flat_grad = param.view(-1), grad.reshape(-1)
        signed, unsigned = (self._code(True, param.device), self._lut(True, param.device)), \
            (self._code(False, param.device), self._lut(False, param.device))
        exp_avg, exp_avg_sq = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        exp_avg_absmax, exp_avg_sq_absmax = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]
        fused = param.device.type in self.fused_devices
        keep_new = ok > 0
        keep_codes = keep_new.to(torch.uint8)  # codes blend as old + (new - old) * keep in uint8 (exact mod 256)
        for start in range(0, flat_param.numel(), self.SLICE_SIZE):
            end = min(start + self.SLICE_SIZE, flat_param.numel())
            blocks = slice(start // self.BLOCK_SIZE, -(-end // self.BLOCK_SIZE))
            moments = ((exp_avg[start:end], exp_avg_absmax[blocks], *signed),
                       (exp_avg_sq[start:end], exp_avg_sq_absmax[blocks], *unsigned))
            first, second = (torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, code, self.BLOCK_SIZE,
                                                                         torch.float32)
                             for codes, absmax, code, _ in moments)
            target = flat_param[start:end]
            work = target if target.dtype == torch.float32 else target.float()
            grad_slice = flat_grad[start:end].float()  # no copy for fp32 gradients
            if fused:
                self._fused_call([work], [grad_slice], [first], [second], state["moment_step"], group, ok, sign)
            else:
                self._foreach([work], [{"moment_step": state["moment_step"], "exp_avg": first, "exp_avg_sq": second}],
                              [grad_slice], group, [ok], sign)
            if work is not target:
                target.copy_(work)
            for (codes, absmax, _, lut), value in zip(moments, (first, second)):
                new_codes, new_absmax = self._quantize_slice(value, lut)
                codes.add_(new_codes.sub_(codes).mul_(keep_codes))  # 5x faster than torch.where here
                torch.where(keep_new, new_absmax, absmax, out=absmax)

    def moments(self, state, group):
        if "exp_avg_absmax" not in state:
            return super().moments(state, group)
        return self._dequantize(state, "exp_avg", True), self._dequantize(state, "exp_avg_sq", False)

    def set_moments(self, state, first, second, group):
        if "exp_avg_absmax" not in state:
            return super().set_moments(state, first, second, group)
        self._quantize(state, "exp_avg", first, True)
        self._quantize(state, "exp_avg_sq", second.clamp_min(0), False)

    def _dequantize(self, state, key, signed):
        return self._functional().dequantize_blockwise(
            state[key], absmax=state[key + "_absmax"], code=self._code(signed, state[key].device),
            blocksize=self.BLOCK_SIZE)

    def _quantize(self, state, key, value, signed):
        """Quantize ``value`` into the existing codes and absmax of ``state[key]``."""
        self._functional().quantize_blockwise(value, code=self._code(signed, value.device),
                                              absmax=state[key + "_absmax"], out=state[key],
                                              blocksize=self.BLOCK_SIZE)


def _step_dtype(state: dict, grad: torch.Tensor) -> torch.dtype:
    """The dtype a step is computed in: the moments' (fp32 / bf16 ...), the gradient's for 8-bit moments."""
    dtype = state["exp_avg"].dtype
    return dtype if dtype.is_floating_point else grad.dtype


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
