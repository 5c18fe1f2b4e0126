"""``ProjectedOptimizer``: one torch optimizer for projected (low-rank) and plain parameter groups.

Parameter groups follow galore-torch's convention: a group with the key ``rank`` is projected, every other group
is plain. Per parameter, the projected path is

    every ``update_proj_gap`` steps of the parameter's own counter (0, T, 2T, ...): refresh the projector and
    apply the moment policy (keep / reset / rotate the inner optimizer's moments)
    R = project(G);  U = inner.update(R);  p -= scale * project_back(U)
    residual rule:   p -= lr * scale * residual_lr_scale * rule(G - project_back(R))      (FRUGAL)
    decoupled weight decay after the update: p -= lr * weight_decay * p                      (galore-torch)

Everything in ``optimizer.state`` is tensors and plain numbers: projector objects live in a private dict and
their tensor state is mirrored in ``state[p]["projector"]``; ``load_state_dict`` rebuilds them lazily.
"""
import inspect
import warnings

import torch
from transformers.utils import logging

from ..projectors import PROJ_TYPES, PROJECTORS, SVDProjector, get_projector, resolve_side
from .inner import INNER_OPTION_DEFAULTS, get_inner
from .modes import MOMENT_POLICIES, RESIDUALS


logger = logging.get_logger(__name__)

PROJECTION_DEFAULTS = {
    "rank": 128,
    "density": None,
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "projector": "svd",
    "projector_options": {},
    "moment_policy": "keep",
    "residual": "none",
    "residual_lr_scale": 1.0,
}
NONFINITE_POLICIES = ("skip", "raise")
_GET_PROJECTOR_OPTIONS = ("quant_bits", "quant_group_size")


def projector_option_names(projector: str) -> list[str]:
    """Options accepted by projector ``projector`` (its constructor keywords plus storage quantization)."""
    params = list(inspect.signature(PROJECTORS[projector].__init__).parameters)[4:]  # self, shape, rank, proj_type
    return sorted(params + list(_GET_PROJECTOR_OPTIONS))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_group(group: dict) -> None:
    inner = get_inner(group["inner"])
    if inner.name == "adamw8bit":
        inner._functional()  # ImportError naming the [bnb] extra when bitsandbytes is missing
    if group["lr"] < 0:
        raise ValueError(f"`lr` must be >= 0, got {group['lr']}.")
    if group["weight_decay"] < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {group['weight_decay']}.")
    if group["eps"] < 0:
        raise ValueError(f"`eps` must be >= 0, got {group['eps']}.")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
    if "rank" not in group:
        return
    for key, value in PROJECTION_DEFAULTS.items():
        group.setdefault(key, dict(value) if isinstance(value, dict) else value)
    rank, density = group["rank"], group["density"]
    if rank is None:
        if density is None or not 0.0 < density <= 1.0:
            raise ValueError(f"`rank` is None, so `density` must be in (0, 1] (FRUGAL's ρ); got {density!r}.")
    elif not _is_int(rank) or rank < 1:
        raise ValueError(f"`rank` must be an int >= 1 (or None with `density`), got {rank!r}.")
    if not _is_int(group["update_proj_gap"]) or group["update_proj_gap"] < 1:
        raise ValueError(f"`update_proj_gap` must be an int >= 1 (steps between refreshes), got {group['update_proj_gap']!r}.")
    if not isinstance(group["scale"], (int, float)) or group["scale"] <= 0:
        raise ValueError(f"`scale` must be > 0 (GaLore's α, e.g. 0.25), got {group['scale']!r}.")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"`proj_type`={group['proj_type']!r} is not supported; use one of {list(PROJ_TYPES)}.")
    if group["projector"] not in PROJECTORS:
        raise ValueError(f"`projector`={group['projector']!r} is unknown; available: {sorted(PROJECTORS)}.")
    allowed = projector_option_names(group["projector"])
    unknown = sorted(set(group["projector_options"]) - set(allowed))
    if unknown:
        raise ValueError(f"Projector {group['projector']!r} does not take option(s) {unknown}; it accepts {allowed}.")
    get_projector(group["projector"], (2, 2), 1, group["proj_type"], **group["projector_options"])  # option values
    if group["moment_policy"] not in MOMENT_POLICIES:
        raise ValueError(f"`moment_policy`={group['moment_policy']!r}; use one of {list(MOMENT_POLICIES)}.")
    if group["moment_policy"] == "rotate" and not inner.supports_rotate:
        raise ValueError(f"`moment_policy`='rotate' is not supported by inner {inner.name!r}; use 'keep' or 'reset'.")
    if group["residual"] not in RESIDUALS:
        raise ValueError(f"`residual`={group['residual']!r}; use one of {list(RESIDUALS)}.")
    if group["residual_lr_scale"] < 0:
        raise ValueError(f"`residual_lr_scale` must be >= 0, got {group['residual_lr_scale']}.")
    for p in group["params"]:
        if _is_sharded(p):
            raise ValueError(
                f"A group with `rank` holds a sharded parameter (a DTensor of global shape {tuple(p.shape)}, e.g. "
                "from FSDP2's fully_shard): projecting one shard's gradient is not the projection of the matrix. "
                "Train low-rank modes with DDP (recipes/accelerate/multi_gpu.yaml) or use a full-rank mode under FSDP."
            )
        if p.dim() != 2:
            raise ValueError(
                f"A group with `rank` holds a parameter of shape {tuple(p.shape)}; only 2-D weights can be projected. "
                "Put it in a group without `rank` (a plain group); under FSDP1 every parameter is a 1-D flat shard, "
                "so train low-rank modes with DDP instead."
            )


def _is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a distributed tensor (FSDP2 / tensor parallel), whose local data is only a shard."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


class ProjectedOptimizer(torch.optim.Optimizer):
    """Projected (GaLore-family / FRUGAL) and plain updates in one optimizer.

    Args:
        params: parameters or groups. Groups with ``rank`` are projected; keys (defaults in ``PROJECTION_DEFAULTS``):
            ``rank`` (or ``None`` with ``density``: rank = round(density * projected dim)), ``update_proj_gap``,
            ``scale``, ``proj_type``, ``projector`` (registry name), ``projector_options``, ``moment_policy``,
            ``residual``, ``residual_lr_scale``. Optional ``param_names`` (used in warnings).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (``eps`` defaults to the paper's 1e-8;
            galore-torch's default is 1e-6). Weight decay is decoupled and applied after the update.
        inner: inner optimizer ('adamw', 'adamw8bit', 'adafactor'); may differ per group.
        nonfinite: what to do with a NaN/Inf gradient (detected by its 2-norm, so an overflowing norm counts):
            'skip' that parameter's step and warn once, or 'raise'.
        **inner_options: inner-specific defaults (``min_8bit_size``, ``block_size``, ``beta1``, ``decay_rate``,
            ``clip_threshold``, ``adafactor_eps``).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 inner: str = "adamw", nonfinite: str = "skip", **inner_options):
        unknown = sorted(set(inner_options) - set(INNER_OPTION_DEFAULTS))
        if unknown:
            raise TypeError(f"ProjectedOptimizer got unknown option(s) {unknown}; inner options are "
                            f"{sorted(INNER_OPTION_DEFAULTS)}.")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`nonfinite`={nonfinite!r}; use one of {list(NONFINITE_POLICIES)}.")
        self.nonfinite = nonfinite
        self._projectors: dict[torch.Tensor, object] = {}
        self._warned: set[str] = set()
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "inner": inner,
                    **INNER_OPTION_DEFAULTS, **inner_options}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])

    # --- stepping ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_params(params, group)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor, group: dict) -> None:
        """Update one parameter of ``group`` from its ``.grad`` (what layer-wise hooks call)."""
        if p.grad is not None:
            self._step_params([p], group)

    def _step_params(self, params: list[torch.Tensor], group: dict) -> None:
        params = self._finite_only(params, group)
        if not params:
            return
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("ProjectedOptimizer does not support sparse gradients.")
        inner = get_inner(group["inner"])
        states = [self.state[p] for p in params]
        if "rank" in group:
            projectors = [self._projector(p, group) for p in params]
            lows = [self._project(p, g, s, pr, group) for p, g, s, pr in zip(params, grads, states, projectors)]
            for p, projector, step in zip(params, projectors, inner.update(states, lows, group)):
                _add_projected_back(p, projector, step, alpha=-group["scale"])
            if group["residual"] != "none":
                self._apply_residual(params, grads, lows, projectors, group)
        else:
            for p, state in zip(params, states):
                if "moment_step" not in state:
                    state["step"] = 0
                    inner.init_state(state, p.shape, p, group)
                state["step"] += 1
            inner.apply(params, states, grads, group)
        if group["weight_decay"] > 0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])

    def _project(self, p, grad, state, projector, group):
        """Refresh on schedule (galore-torch: steps 0, T, 2T, ... of this parameter), then project."""
        if "step" not in state:
            state["step"] = 0
        if state["step"] % group["update_proj_gap"] == 0 or not projector.initialized:
            self._refresh(p, grad, state, projector, group)
        low = projector.project(grad)
        if "moment_step" not in state:
            get_inner(group["inner"]).init_state(state, low.shape, low, group)
        state["step"] += 1
        return low

    def _apply_residual(self, params, grads, lows, projectors, group):
        lr = group["lr"] * group["scale"] * group["residual_lr_scale"]
        for p, grad, low, projector in zip(params, grads, lows, projectors):
            residual = grad - projector.project_back(low)
            p.add_(residual.sign_() if group["residual"] == "signsgd" else residual, alpha=-lr)

    # --- projectors ----------------------------------------------------------------------------------
    def _projector(self, p: torch.Tensor, group: dict):
        """The projector of ``p``, built on first use or rebuilt from ``state[p]['projector']`` after a load."""
        projector = self._projectors.get(p)
        if projector is None:
            shape = tuple(p.shape)
            rank = group["rank"]
            if rank is None:
                side = resolve_side(shape, group["proj_type"])
                rank = max(1, round(group["density"] * shape[0 if side == "left" else 1]))
            options = dict(group["projector_options"])
            if "seed" in projector_option_names(group["projector"]):
                options["seed"] = options.get("seed", 0) + self._param_index(p)  # distinct per parameter
            projector = get_projector(group["projector"], shape, rank, group["proj_type"], **options)
            if self.state[p].get("projector"):
                projector.load_state_dict(self.state[p]["projector"])
            self._projectors[p] = projector
        return projector

    def _param_index(self, p: torch.Tensor) -> int:
        flat = [q for g in self.param_groups for q in g["params"]]
        return next(i for i, q in enumerate(flat) if q is p)

    def _refresh(self, p, grad, state, projector, group) -> None:
        policy = group["moment_policy"]
        has_moments = "moment_step" in state
        previous = projector.basis() if policy == "rotate" and has_moments and projector.initialized else None
        try:
            projector.update(grad)
        except torch.linalg.LinAlgError as err:
            self._fall_back(p, grad, projector, group, err)
        state["projector"] = projector.state_dict()
        if not has_moments:
            return
        inner = get_inner(group["inner"])
        if policy == "reset":
            inner.init_state(state, state_shape(state), grad, group)
        elif previous is not None:
            self._rotate_moments(state, projector, previous, inner, group)

    @staticmethod
    def _rotate_moments(state, projector, previous, inner, group) -> None:
        """Re-express the moments in the new basis. First moment: ``R m`` with ``R = Qᵀ Q_prev``. Second moment
        (per-coordinate variances): ``(R∘R) v``, the variance of ``R x`` for independent coordinates, which also
        keeps it non-negative."""
        rotation = projector.rotation_from(previous)
        first, second = inner.moments(state, group)
        rot, rot_sq = rotation.to(first.dtype), rotation.square().to(second.dtype)
        if projector.side == "left":
            first, second = rot @ first, rot_sq @ second
        else:
            first, second = first @ rot.T, second @ rot_sq.T
        inner.set_moments(state, first, second, group)

    def _fall_back(self, p, grad, projector, group, err) -> None:
        name = self._name(p, group)
        if projector.initialized:
            logger.warning(f"SVD failed for {name} ({err}); keeping the previous projector for this period.")
            return
        if not isinstance(projector, SVDProjector):
            raise err
        logger.warning(f"SVD failed for {name} ({err}) and there is no previous projector; using randomized SVD.")
        fallback = get_projector("randomized", projector.shape, projector.rank, group["proj_type"])
        fallback.update(grad)
        projector.load_state_dict({"basis": fallback.basis()})

    # --- non-finite gradients ------------------------------------------------------------------------
    def _finite_only(self, params, group):
        if params[0].device.type == "meta":
            return params
        norms = torch._foreach_norm([p.grad for p in params])  # 2-norm: one cheap pass (inf-norm is ~7x slower)
        bad = (~torch.isfinite(torch.stack(norms))).nonzero().flatten().tolist()
        if not bad:
            return params
        names = [self._name(params[i], group) for i in bad]
        if self.nonfinite == "raise":
            raise FloatingPointError(f"Non-finite gradient in {names}; pass nonfinite='skip' to skip such steps.")
        for name in names:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"Non-finite gradient in {name}: skipping its update (warned once per parameter).",
                              RuntimeWarning, stacklevel=4)
        skipped = set(bad)
        return [p for i, p in enumerate(params) if i not in skipped]

    @staticmethod
    def _name(p, group) -> str:
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        names = group.get("param_names")
        return repr(names[index]) if names else f"parameter #{index} (shape {tuple(p.shape)}) of its group"

    # --- state ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every parameter's state as its first step would, without stepping or needing gradients.

        Works on ``meta`` parameters (state becomes meta tensors of the true shapes and dtypes), so
        ``optimizer_state_bytes`` can size LLaMA-7B state without allocating it. Harmless on real parameters:
        the first real step refreshes the projectors from the real gradient as usual.
        """
        for group in self.param_groups:
            inner = get_inner(group["inner"])
            for p in group["params"]:
                state = self.state[p]
                if "moment_step" in state:
                    continue
                state["step"] = 0
                if "rank" in group:
                    projector = self._projector(p, group)
                    zeros = torch.zeros_like(p)
                    projector.update(zeros)
                    state["projector"] = projector.state_dict()
                    low = projector.project(zeros)
                    inner.init_state(state, low.shape, low, group)
                else:
                    inner.init_state(state, p.shape, p, group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but every state tensor keeps its saved dtype (8-bit codes, fp32 bases and moments stay
        as they were) and moves to its parameter's device; projectors are rebuilt from their saved tensors."""
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params))
        for pid, saved in state_dict["state"].items():
            p = by_id[pid]
            self.state[p] = _to_device(saved, p.device)
        self._projectors.clear()


def _add_projected_back(p: torch.Tensor, projector, low: torch.Tensor, alpha: float) -> None:
    """``p += alpha * projector.project_back(low)`` as one ``addmm_``: no full-size temporary per parameter."""
    basis = projector.basis().to(p.dtype)
    if projector.side == "left":
        p.addmm_(basis, low.to(p.dtype), alpha=alpha)
    else:
        p.addmm_(low.to(p.dtype), basis.T, alpha=alpha)


def state_shape(state: dict) -> torch.Size:
    """Shape of the moments (the low-rank gradient's shape) recorded in ``state``."""
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            return state[key].shape
    return torch.Size(state["exp_avg_sq_row"].shape + state["exp_avg_sq_col"].shape[-1:])


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def optimizer_state_bytes(optimizer) -> int:
    """Exact bytes of every tensor in ``optimizer.state`` (moments, 8-bit codes and scales, projector tensors).

    Meta tensors count by shape and dtype, so call ``optimizer.init_state()`` on a meta-device model to size state
    without allocating it.
    """
    def count(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        return 0

    return sum(count(state) for state in optimizer.state.values())
