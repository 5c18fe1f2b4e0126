"""``ProjectedOptimizer``: one torch optimizer for projected (low-rank) and plain parameter groups.

Parameter groups follow galore-torch's convention: a group with the key ``rank`` is projected, every other group
is plain. Per parameter, the projected path is

    when the refresh policy says so (``fixed``: every ``update_proj_gap`` steps of the parameter's own counter,
    0, T, 2T, ...; ``lazy``: Q-GaLore's growing per-layer gap, ``hf_lowrank.optim.refresh``): refresh the
    projector and apply the moment policy (keep / reset / rotate the inner optimizer's moments)
    R = project(G);  U = inner.update(R);  p -= scale * project_back(U)
    residual rule:   p -= lr * scale * residual_lr_scale * rule(G - project_back(R))      (FRUGAL)
    decoupled weight decay after the update: p -= lr * weight_decay * p                      (galore-torch)

A parameter with an update sink (``hf_lowrank.optim.sinks``, e.g. a Q-GaLore INT8 weight) is stepped on a float
working copy that the sink then stores. Everything in ``optimizer.state`` is tensors and plain numbers: projector
objects live in a private dict and their tensor state is mirrored in ``state[p]["projector"]``; ``load_state_dict``
rebuilds them lazily.

Distributed training (``hf_lowrank.optim.distributed``): under DDP each refresh runs on one owner rank and is
broadcast; FSDP2 (DTensor, ``Shard(0)``) parameters are stepped shard-locally, with the refresh computed from the
full gradient gathered on the owner. Non-finite gradients are detected and skipped on the device (no host sync
outside refresh steps).
"""
from functools import partial

import torch
from transformers.utils import logging

from ..projectors import PROJ_TYPES, PROJECTORS, SVDProjector, get_projector, projector_option_names, resolve_side
from . import distributed as dist_driver
from . import refresh as refresh_policy
from .inner import INNER_OPTION_DEFAULTS, get_inner
from .modes import GALORE_DEFAULTS, MOMENT_POLICIES, RESIDUALS
from .sinks import update_sink_of


logger = logging.get_logger(__name__)

PROJECTION_DEFAULTS = {
    **GALORE_DEFAULTS,
    "density": None,
    "proj_type": "std",
    "projector": "svd",
    "projector_options": {},
    "moment_policy": "keep",
    "residual": "none",
    "residual_lr_scale": 1.0,
    **refresh_policy.REFRESH_DEFAULTS,
}
# Group settings that define what the optimizer does and what its state means: a checkpoint saved with other values
# is refused unless the caller opts in to adopting them (torch would silently replace the requested ones).
PLAIN_SETTINGS_KEYS = ("inner", *INNER_OPTION_DEFAULTS)
SETTINGS_KEYS = (*PLAIN_SETTINGS_KEYS, *PROJECTION_DEFAULTS)
NONFINITE_POLICIES = ("skip_step", "skip_param", "raise")
DISTRIBUTED_POLICIES = ("auto", "off")
# Inner optimizers whose state is elementwise, so a row shard of it is the state of the row shard (FSDP2).
_SHARDABLE_INNERS = ("adamw",)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fill_projection_defaults(group: dict) -> None:
    """Give a projected group every projection key it lacks (a new group, or one loaded from an older version)."""
    for key, value in PROJECTION_DEFAULTS.items():
        group.setdefault(key, dict(value) if isinstance(value, dict) else value)


def _validate_group(group: dict) -> None:
    inner = get_inner(group["inner"])
    if inner.name == "adamw8bit":
        inner._functional()  # ImportError naming the [bnb] extra when bitsandbytes is missing
        if group["block_size"] != inner.BLOCK_SIZE:
            raise ValueError(f"`block_size`={group['block_size']!r}: the 8-bit moments are updated by bitsandbytes' "
                             f"fused kernel, which works on blocks of {inner.BLOCK_SIZE}; pass "
                             f"block_size={inner.BLOCK_SIZE} (the default) or leave it out.")
    for key in ("lr", "weight_decay", "eps"):
        if not (_is_number(group[key]) or (key == "lr" and isinstance(group[key], torch.Tensor))):
            raise TypeError(f"`{key}` must be a number, got {type(group[key]).__name__} {group[key]!r}"
                            f"{' (write it without quotes, e.g. 1e-3)' if isinstance(group[key], str) else ''}.")
    if not isinstance(group["betas"], (tuple, list)) or not all(_is_number(b) for b in group["betas"]):
        raise TypeError(f"`betas` must be two numbers, e.g. (0.9, 0.999); got {group['betas']!r}.")
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
    _fill_projection_defaults(group)
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
    refresh_policy.validate(group)
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(
                f"A group with `rank` holds a parameter of shape {tuple(p.shape)}; only 2-D weights can be projected. "
                "Put it in a group without `rank` (a plain group); under FSDP1 every parameter is a 1-D flat shard, "
                "so train low-rank modes with FSDP2 (fully_shard) or DDP instead."
            )


class ProjectedOptimizer(torch.optim.Optimizer):
    """Projected (GaLore-family / FRUGAL) and plain updates in one optimizer.

    Args:
        params: parameters or groups. Groups with ``rank`` are projected; keys (defaults in ``PROJECTION_DEFAULTS``):
            ``rank`` (or ``None`` with ``density``: rank = round(density * projected dim)), ``update_proj_gap``,
            ``scale``, ``proj_type``, ``projector`` (registry name), ``projector_options``, ``moment_policy``,
            ``residual``, ``residual_lr_scale``, ``refresh`` ('fixed' or 'lazy') with the lazy policy's
            ``cos_threshold``, ``gamma_proj``, ``queue_size``, ``queue_reset``. Optional ``param_names`` (used in
            messages).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (``eps`` defaults to the paper's 1e-8;
            galore-torch's default is 1e-6). Weight decay is decoupled and applied after the update.
        inner: inner optimizer ('adamw', 'adamw8bit', 'adafactor'); may differ per group.
        nonfinite: what a NaN/Inf gradient (detected by its 2-norm, so an overflowing norm counts) does:
            'skip_step' skips the whole step of every parameter, like ``torch.amp.GradScaler``, on every rank
            alike; 'skip_param' skips only the affected parameters; 'raise' stops with the parameter names (one
            host sync per step). The default, None, is 'skip_step' for ``step()`` and 'skip_param' for layer-wise
            updates (``step_parameter``), where a whole step cannot be skipped. Skips are decided on the device and counted:
            :meth:`nonfinite_report`, logged by :class:`hf_lowrank.callbacks.NonFiniteLogCallback`.
        distributed: 'auto' (default): with an initialized process group of several ranks, plain parameters are
            data-parallel replicas (DDP) whose refreshes run on one owner rank and are broadcast, and DTensor
            parameters are FSDP2 row shards. 'off': every rank refreshes from its own gradient (DTensors still
            need 'auto').
        adopt_saved_settings: by default ``load_state_dict`` refuses a checkpoint whose groups were saved with other
            settings (mode parts, rank, gap, scale, projector options, inner optimizer), naming them; True continues
            with the saved settings instead (torch's own behaviour).
        **inner_options: inner-specific defaults (``min_8bit_size``, ``block_size``, ``beta1``, ``decay_rate``,
            ``clip_threshold``, ``adafactor_eps``).
    """

    # step() updates a group's parameters in chunks of at most this many elements (a larger parameter is a chunk
    # of its own): the step's temporaries (low-rank gradients, steps, dtype casts) are then a chunk's, not the
    # whole model's, while each chunk still runs the inner optimizer's fused / foreach kernels.
    step_chunk_numel: int = 1 << 27

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 inner: str = "adamw", nonfinite: str | None = None, distributed: str = "auto",
                 adopt_saved_settings: bool = False, **inner_options):
        unknown = sorted(set(inner_options) - set(INNER_OPTION_DEFAULTS))
        if unknown:
            raise TypeError(f"ProjectedOptimizer got unknown option(s) {unknown}; inner options are "
                            f"{sorted(INNER_OPTION_DEFAULTS)}.")
        if nonfinite is not None and nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`nonfinite`={nonfinite!r}; use one of {list(NONFINITE_POLICIES)}.")
        if distributed not in DISTRIBUTED_POLICIES:
            raise ValueError(f"`distributed`={distributed!r}; use one of {list(DISTRIBUTED_POLICIES)}.")
        self.nonfinite = nonfinite
        self.distributed = distributed
        self.adopt_saved_settings = adopt_saved_settings
        self.comm = dist_driver.CommStats()
        self._projectors: dict[torch.Tensor, object] = {}
        self._layouts: dict[torch.Tensor, dist_driver.Layout] = {}
        self._owners: dict[torch.Tensor, int] = {}
        self._skips: dict[torch.Tensor, torch.Tensor] = {}
        self._flat: dict[torch.Tensor, dist_driver.FlatPartition] = {}
        self._skipped_steps: torch.Tensor | None = None
        betas = tuple(betas) if isinstance(betas, (list, tuple)) else betas  # anything else: a clear error
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "inner": inner,
                    **INNER_OPTION_DEFAULTS, **inner_options}
        self.original_parameters: dict[int, int] = {}  # id -> index, kept when a wrapper replaces the groups' params
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])
        self._owners.clear()
        for p in self.param_groups[-1]["params"]:
            self.original_parameters.setdefault(id(p), len(self.original_parameters))

    # --- stepping ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        work = [(group, params) for group, params in work if params]
        if work:
            oks = iter(self._finite_flags([p for _, params in work for p in params], self.nonfinite or "skip_step"))
            for group, params in work:
                group_oks = [next(oks) for _ in params]
                for chunk in _chunks(params, self.step_chunk_numel):
                    self._step_params([params[i] for i in chunk], group, [group_oks[i] for i in chunk])
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor, group: dict) -> None:
        """Update one parameter of ``group`` from its ``.grad`` (what layer-wise hooks call).

        A non-finite gradient skips this parameter only (``nonfinite='skip_step'`` cannot be honoured one
        parameter at a time; layer-wise optimizers refuse it; 'raise' raises).
        """
        self.step_parameters([p], group)

    @torch.no_grad()
    def step_parameters(self, params: list[torch.Tensor], group: dict) -> None:
        """Update several parameters of ``group`` at once, as :meth:`step_parameter` does each (a DDP bucket:
        their due refreshes are then shared between the ranks in one round)."""
        params = [p for p in params if p.grad is not None]
        if params:
            policy = "raise" if self.nonfinite == "raise" else "skip_param"
            self._step_params(params, group, self._finite_flags(params, policy))

    def _step_params(self, params: list[torch.Tensor], group: dict, oks: list[torch.Tensor]) -> None:
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("ProjectedOptimizer does not support sparse gradients.")
        if len(params) > 1 and params[0] not in self._flat and any(update_sink_of(p) is not None for p in params):
            for p, ok in zip(params, oks):  # one float working copy of a quantized weight alive at a time
                self._step_params([p], group, [ok])
            return
        inner = get_inner(group["inner"])
        layouts = [self._layout(p, group) for p in params]
        sinks = {p: sink for p in params if (sink := update_sink_of(p)) is not None}
        if sinks and (params[0] in self._flat or any(layout.sharded for layout in layouts)):
            raise ValueError("Parameters with an update sink (quantized weights, e.g. Q-GaLore's) train under DDP or "
                             "a single process; FSDP2 shards and DeepSpeed partitions are not supported.")
        targets = {p: sinks[p].begin() if p in sinks else dist_driver.local(p) for p in params}
        if "rank" in group and params[0] in self._flat:
            self._flat_projected_step(params[0], group, oks[0], inner)
        elif "rank" in group:
            params, oks = self._projected_step(params, targets, layouts, group, oks, inner)
        else:
            grads = [dist_driver.local(p.grad) for p in params]
            _zero_where_skipped(grads, oks)
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if "moment_step" not in state:
                    state["step"] = 0
                    inner.init_state(state, targets[p].shape, targets[p], group)
                state["step"] += 1
            inner.apply([targets[p] for p in params], states, grads, group, oks)
        if group["weight_decay"] > 0 and params:
            written = [targets[p] for p in params]
            torch._foreach_addcmul_(written, written, oks, value=-group["lr"] * group["weight_decay"])
        for p, ok in zip(params, oks):
            if p in sinks:
                sinks[p].commit(targets[p], ok, self.state[p]["step"])

    def _projected_step(self, params, targets, layouts, group, oks, inner):
        """Refresh (on schedule), project, inner update, project back into ``targets[p]``, residual. Returns the
        stepped params."""
        projectors = [self._projector(p, group) for p in params]
        states = [self.state[p] for p in params]
        for state in states:
            state.setdefault("step", 0)
        due = [i for i, (s, pr) in enumerate(zip(states, projectors))
               if refresh_policy.is_due(s, s["step"], group) or not pr.initialized]
        waiting = self._refresh_due(due, params, layouts, projectors, states, group, oks) if due else set()
        for i in waiting:  # skipped now; the schedule does not advance, so the refresh runs at the next step
            states[i]["step"] -= 1
        keep = [i for i, pr in enumerate(projectors) if pr.initialized]  # a first step with a bad gradient waits
        params, layouts, projectors, states, oks = ([xs[i] for i in keep]
                                                    for xs in (params, layouts, projectors, states, oks))
        grads = [dist_driver.local(p.grad) for p in params]
        if group["residual"] != "none":
            _zero_where_skipped(grads, oks)
        bases = [_local_basis(pr, layout) for pr, layout in zip(projectors, layouts)]
        lows = [self._project(pr, q, g, layout) for pr, q, g, layout in zip(projectors, bases, grads, layouts)]
        _zero_where_skipped(lows, oks)
        for state, low in zip(states, lows):
            if "moment_step" not in state:
                inner.init_state(state, low.shape, low, group)
            state["step"] += 1
        for p, pr, q, step in zip(params, projectors, bases, inner.update(states, lows, group, oks)):
            _add_projected_back(targets[p], pr.side, q, step, alpha=-group["scale"])
        if group["residual"] != "none":
            lr = group["lr"] * group["scale"] * group["residual_lr_scale"]
            for p, pr, q, grad, low, ok in zip(params, projectors, bases, grads, lows, oks):
                residual = grad - _project_back(pr.side, q, low)
                if group["residual"] == "signsgd":
                    residual.sign_()
                targets[p].add_(residual.mul_(ok), alpha=-lr)
        return params, oks

    def _flat_projected_step(self, flat, group, ok, inner) -> None:
        """The projected step of a group held as one flat partition (DeepSpeed ZeRO-1/2). Each matrix's low-rank
        gradient is the sum of every rank's piece's contribution (one all-reduce), so every rank holds the same
        low-rank moments; each rank then writes the update into its own elements only."""
        partition, layout = self._flat[flat], self._layouts[flat]
        grad = flat.grad
        _zero_where_skipped([grad], [ok])
        state = self.state[flat]
        state.setdefault("step", 0)
        pieces_state = state.setdefault("pieces", {})
        pieces = partition.pieces()
        states = [pieces_state.setdefault(piece.index, {}) for piece in pieces]
        projectors = []
        for piece, piece_state in zip(pieces, states):
            key = (flat, piece.index)
            if key not in self._projectors:
                self._projectors[key] = self._new_projector(piece.shape, piece.index, group, piece_state)
            projectors.append(self._projectors[key])
        due = [i for i, (pr, st) in enumerate(zip(projectors, states))
               if refresh_policy.is_due(st, state["step"], group) or not pr.initialized]
        if due:
            entries = [(pr, st, grad, layout, partition.owners[k], partial(self._fit, flat, pr, group),
                        partial(partition.gather, k, grad, partition.owners[k]))
                       for k, (pr, st) in enumerate(zip(projectors, states))]
            if self._refresh(due, entries, group, [ok] * len(pieces), [state["step"]] * len(pieces)):
                return  # the gradient is not finite: skipped, and the refresh runs at the next step
        bases = [pr.basis().to(grad.dtype) for pr in projectors]  # dequantised / generated once per step
        lows, blocks = [], []
        for piece, pr, basis in zip(pieces, projectors, bases):
            held = piece.end > piece.start
            first, block = piece.block(grad) if held else (0, None)
            blocks.append((first, block))
            rows = block.shape[0] if held else 0
            if pr.side == "right":
                low = grad.new_zeros((piece.shape[0], pr.rank))
                if held:
                    low[first: first + rows] = block @ basis
            else:
                low = basis[first: first + rows].T @ block if held else grad.new_zeros((pr.rank, piece.shape[1]))
            lows.append(low)
        for low in lows:  # the same order on every rank
            dist_driver.all_reduce_(low, layout)
            self.comm.count("step", low)
        for piece_state, low in zip(states, lows):
            if "moment_step" not in piece_state:
                inner.init_state(piece_state, low.shape, low, group)
        state["step"] += 1
        lr = group["lr"] * group["scale"] * group["residual_lr_scale"]
        steps = inner.update(states, lows, group, [ok] * len(pieces))
        for piece, pr, basis, low, step, (first, block) in zip(pieces, projectors, bases, lows, steps, blocks):
            if block is None:
                continue
            rows = slice(first, first + block.shape[0])  # the block's rows of the m x n matrix
            piece.add_(flat, first, _project_back_rows(pr.side, basis, rows, step), alpha=-group["scale"])
            if group["residual"] != "none":
                residual = block - _project_back_rows(pr.side, basis, rows, low)
                if group["residual"] == "signsgd":
                    residual.sign_()
                piece.add_(flat, first, residual.mul_(ok), alpha=-lr)

    def use_flat_partition(self, flat: torch.Tensor, partition: "dist_driver.FlatPartition") -> None:
        """Declare that ``flat`` (a 1-D parameter of one of the groups) is this rank's partition of the group's
        matrices as described by ``partition`` (see ``hf_lowrank.optim.deepspeed.attach_zero``)."""
        self._flat[flat] = partition
        self._layouts[flat] = partition.layout()  # flags agreed over the ranks; no DTensor state

    def _project(self, projector, basis, grad, layout):
        """The low-rank gradient of the local data; a left projection of a row shard sums over the shards."""
        if projector.side == "right":
            return grad @ basis.to(grad.dtype)
        low = basis.to(grad.dtype).T @ grad
        if layout.sharded:
            dist_driver.all_reduce_(low, layout)
            self.comm.count("step", low)
        return low

    # --- projectors ----------------------------------------------------------------------------------
    def _projector(self, p: torch.Tensor, group: dict):
        """The projector of ``p``, built on first use or rebuilt from ``state[p]['projector']`` after a load."""
        projector = self._projectors.get(p)
        if projector is None:
            if p.dim() != 2:
                raise ValueError(
                    f"Projected parameter {self._name(p, group)} has shape {tuple(p.shape)} at step time: it was "
                    "flattened after the optimizer was built (DeepSpeed ZeRO and FSDP1 flatten parameters). Under "
                    "DeepSpeed ZeRO-1/2 call hf_lowrank.optim.deepspeed.attach_zero(engine.optimizer) once after "
                    "deepspeed.initialize (Trainer: add hf_lowrank.optim.deepspeed.DeepSpeedZeroCallback()); FSDP1 "
                    "is not supported: use FSDP2 (fully_shard). See the README's support table."
                )
            projector = self._new_projector(tuple(p.shape), self._param_index(p), group, self.state[p])
            self._projectors[p] = projector
        return projector

    @staticmethod
    def _new_projector(shape, index: int, group: dict, state: dict):
        rank = group["rank"]
        if rank is None:
            side = resolve_side(shape, group["proj_type"])
            rank = max(1, round(group["density"] * shape[0 if side == "left" else 1]))
        options = dict(group["projector_options"])
        if "seed" in projector_option_names(group["projector"]):
            options["seed"] = options.get("seed", 0) + index  # distinct per parameter
        projector = get_projector(group["projector"], shape, rank, group["proj_type"], **options)
        if state.get("projector"):
            projector.load_state_dict(state["projector"])
        return projector

    def _param_index(self, p: torch.Tensor) -> int:
        flat = [q for g in self.param_groups for q in g["params"]]
        return next(i for i, q in enumerate(flat) if q is p)

    def _layout(self, p: torch.Tensor, group: dict) -> dist_driver.Layout:
        layout = self._layouts.get(p)
        if layout is None:
            if not dist_driver.is_dtensor(p) and id(p) not in self.original_parameters:
                raise ValueError(
                    f"A parameter of shape {tuple(p.shape)} that this optimizer was not built with is in its groups "
                    "(a wrapper replaced them: DeepSpeed ZeRO-1/2 flattens each group into one partition). Call "
                    "hf_lowrank.optim.deepspeed.attach_zero(engine.optimizer) after deepspeed.initialize (Trainer: "
                    "add hf_lowrank.optim.deepspeed.DeepSpeedZeroCallback()), so each rank's partition is mapped to "
                    "the matrices and the ranks agree on skipped steps."
                )
            if dist_driver.is_dtensor(p) and self.distributed == "off":
                raise ValueError("`distributed`='off' cannot step DTensor (FSDP2) parameters; use 'auto'.")
            layout = dist_driver.layout_of(p, replicated=self.distributed == "auto")
            if layout.sharded and group["inner"] not in _SHARDABLE_INNERS:  # DTensors (flat partitions are set)
                raise ValueError(
                    f"inner={group['inner']!r} is not supported on FSDP2-sharded parameters yet (its state is "
                    f"block-wise or factored over the whole matrix, not per row); parameter {self._name(p, group)}. "
                    "Use an AdamW mode (adamw, galore, galore_randomized, galore_dct, galore_random, frugal) "
                    "under FSDP2, or this mode under DDP."
                )
            self._layouts[p] = layout
        return layout

    def _owner(self, p: torch.Tensor, layout) -> int:
        """The rank that computes ``p``'s refreshes (balanced over all projected matrices of its process group)."""
        if p not in self._owners:
            projected = [q for g in self.param_groups if "rank" in g for q in g["params"]]
            owners = dist_driver.assign_owners([tuple(q.shape) for q in projected], layout.world_size)
            self._owners = dict(zip(projected, owners))
        return self._owners[p]

    def _refresh_due(self, due, params, layouts, projectors, states, group, oks) -> set[int]:
        """Refresh the projectors of ``due``; returns those left waiting for a finite gradient (one host sync:
        a refresh is computed from the gradient, so it needs to know)."""
        grads = [dist_driver.local(p.grad) for p in params]
        owners = [self._owner(p, layout) if layout.distributed else 0 for p, layout in zip(params, layouts)]
        fits = [partial(self._fit, p, projector, group) for p, projector in zip(params, projectors)]
        return self._refresh(due, [(projectors[i], states[i], grads[i], layouts[i], owners[i], fits[i], None)
                                   for i in range(len(params))], group, oks, [s["step"] for s in states])

    def _refresh(self, due, entries, group, oks, steps) -> set[int]:
        """``entries[i]``: (projector, state, local gradient, layout, owner, fit, gather), refreshed at step
        ``steps[i]``; see ``_refresh_due``."""
        flags = torch.stack([oks[i] for i in due])
        finite = [True] * len(due) if _without_data(flags) else flags.cpu().tolist()
        waiting = {i for i, ok in zip(due, finite) if not ok}
        due = [i for i in due if i not in waiting]
        policy = group["moment_policy"]
        previous = {i: entries[i][0].basis() for i in due
                    if policy == "rotate" and "moment_step" in entries[i][1] and entries[i][0].initialized}
        lazy = group["refresh"] == "lazy"
        leading = [refresh_policy.leading_direction(previous[i] if i in previous else entries[i][0].basis())
                   if lazy and entries[i][0].initialized else None for i in due]
        items = [dist_driver.RefreshItem(*(entries[i][j] for j in (0, 2, 3, 4, 5)), gather=entries[i][6])
                 for i in due]
        dist_driver.refresh(items, self.comm)
        current = [refresh_policy.leading_direction(entries[i][0].basis()) if lazy else None for i in due]
        refresh_policy.record([entries[i][1] for i in due], [steps[i] for i in due], leading, current, group)
        inner = get_inner(group["inner"])
        for i in due:
            projector, state, grad = entries[i][:3]
            state["projector"] = projector.state_dict()
            if "moment_step" not in state:
                continue
            if policy == "reset":
                inner.init_state(state, state_shape(state), grad, group)
            elif i in previous:
                self._rotate_moments(state, projector, previous[i], inner, group)
        return waiting

    def _fit(self, p, projector, group, grad) -> None:
        try:
            projector.update(grad)
        except torch.linalg.LinAlgError as err:
            self._fall_back(p, grad, projector, group, err)

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
    def _finite_flags(self, params, policy) -> list[torch.Tensor]:
        """One 0-dim float flag per parameter (1: step, 0: skip), computed on the device from one fused norm
        pass; under FSDP2 the flags are agreed over the ranks, so every rank skips the same steps."""
        grads = [dist_driver.local(p.grad) for p in params]
        if _without_data(grads[0]):
            return [torch.ones((), device=grads[0].device)] * len(params)
        norms = torch._foreach_norm(grads)  # 2-norm: one cheap pass (inf-norm is ~7x slower)
        device = grads[0].device
        bad = torch.stack([(~torch.isfinite(n)).to(device) for n in norms]).float()
        sharded = [self._layouts.get(p) or dist_driver.layout_of(p, replicated=False) for p in params]
        sharded = next((layout for layout in sharded if layout.sharded), None)
        if sharded is not None:
            dist_driver.all_reduce_(bad, sharded, op=torch.distributed.ReduceOp.MAX)
            self.comm.count("step", bad)
        if policy == "raise":
            if bad.any().item():
                names = [self._name(p, self._group_of(p)) for p, b in zip(params, bad.tolist()) if b]
                raise FloatingPointError(f"Non-finite gradient in {names}; pass nonfinite='skip_step' to skip such "
                                         "steps (or 'skip_param' to skip only those parameters).")
            return [torch.ones((), device=device)] * len(params)  # one flag object: one fused call per group
        if policy == "skip_step":
            skip = bad.max()
            self._skipped_steps = skip if self._skipped_steps is None else self._skipped_steps + skip
            return [1.0 - skip] * len(params)
        for p, b in zip(params, bad.unbind()):
            self._skips[p] = b if p not in self._skips else self._skips[p] + b
        return list((1.0 - bad).unbind())

    def nonfinite_report(self) -> dict:
        """Skips so far: ``{"skipped_steps": n}`` and ``{"skipped_params": {name: n}}`` (non-zero only).
        Reads device counters, so it synchronises: call it when logging, not every step."""
        report = {}
        if self._skipped_steps is not None:
            report["skipped_steps"] = int(self._skipped_steps.item())
        counts = {self._name(p, self._group_of(p)): int(c.item()) for p, c in self._skips.items()}
        if any(counts.values()):
            report["skipped_params"] = {k: v for k, v in counts.items() if v}
        return report

    def refresh_report(self) -> dict:
        """Per projected parameter name: ``refreshes`` done, ``scheduled`` (what the fixed ``update_proj_gap``
        would have done), ``skipped`` (SVDs a lazy policy saved) and its current ``gap``. Host numbers only."""
        report = {}
        for group in self.param_groups:
            if "rank" not in group:
                continue
            names = group.get("param_names")
            for index, p in enumerate(group["params"]):
                state = self.state.get(p)
                if state and "step" in state:
                    name = names[index] if names else self._name(p, group)
                    report[name] = refresh_policy.report(state, state["step"], group)
        return report

    def release_state(self, params) -> int:
        """Free the optimizer state of ``params`` (moments, projector, skip counters), e.g. of blocks that a
        layer-sampling method (OwLore, LISA) deactivated, so memory does not grow across resamples. A released
        parameter that trains again starts from fresh state: its projector is refitted at its next step.
        Returns the bytes freed."""
        freed = 0
        for p in params:
            freed += optimizer_state_bytes_of(self.state.pop(p, {}))
            self._projectors.pop(p, None)
            self._skips.pop(p, None)
        return freed

    def _group_of(self, p) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @staticmethod
    def _name(p, group) -> str:
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        names = group.get("param_names")
        return repr(names[index]) if names else f"parameter #{index} (shape {tuple(p.shape)}) of its group"

    # --- state ----------------------------------------------------------------------------------------
    def _check_saved_settings(self, saved_groups) -> None:
        def kind(groups):
            return [("projected" if "rank" in g else "plain") + f" ({len(g['params'])} params)" for g in groups]

        if len(saved_groups) != len(self.param_groups) or any(
                ("rank" in saved) != ("rank" in group) for saved, group in zip(saved_groups, self.param_groups)):
            raise ValueError(
                f"This checkpoint's parameter groups {kind(saved_groups)} do not match this optimizer's "
                f"{kind(self.param_groups)}: it was saved with another mode or other target_modules. Build the "
                "optimizer as it was built for the checkpoint (same mode, target_modules and rank).")
        if self.adopt_saved_settings:
            return
        differences = []
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            keys = SETTINGS_KEYS if "rank" in group else PLAIN_SETTINGS_KEYS
            for key in keys:
                default = PROJECTION_DEFAULTS.get(key, self.defaults.get(key))
                if saved.get(key, default) != group.get(key, default):
                    differences.append(f"group {index} {key}: saved {saved.get(key, default)!r}, "
                                       f"requested {group.get(key, default)!r}")
        if differences:
            raise ValueError("The checkpoint was saved with other optimizer settings: " + "; ".join(differences)
                             + ". Build the optimizer with the saved settings, or pass adopt_saved_settings=True "
                             "(create_optimizer / ProjectedOptimizer) to continue with them.")

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
                if dist_driver.is_dtensor(p):
                    raise NotImplementedError("init_state() sizes state of plain tensors; call it before sharding.")
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

    def _row_sharded_keys(self, p, group) -> tuple[str, ...]:
        """State entries of a sharded ``p`` that hold its rows (all others are replicated)."""
        if "rank" in group and resolve_side(tuple(p.shape), group["proj_type"]) == "left":
            return ()
        return ("exp_avg", "exp_avg_sq")

    def state_dict(self) -> dict:
        """torch's layout; under FSDP2 the row-sharded entries are DTensors laid out like their parameter, so
        ``torch.distributed.checkpoint`` saves, reshards and consolidates them."""
        state_dict = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        groups = [g for g in self.param_groups for _ in g["params"]]
        for index, (p, group) in enumerate(zip(params, groups)):
            if index in state_dict["state"] and dist_driver.is_dtensor(p):
                layout = self._layout(p, group)
                entry = dict(state_dict["state"][index])
                for key in self._row_sharded_keys(p, group):
                    if key in entry:
                        entry[key] = dist_driver.shard_state(entry[key], p, layout.global_rows)
                state_dict["state"][index] = entry
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but every state tensor keeps its saved dtype (8-bit codes, fp32 bases and moments stay
        as they were) and moves to its parameter's device; projectors are rebuilt from their saved tensors.
        Under FSDP2, DTensor entries become local shards and full (consolidated) entries are cut to this rank's
        rows, so a single-process checkpoint resumes sharded and vice versa. Settings that differ from the saved
        ones raise (see ``adopt_saved_settings``)."""
        self._check_saved_settings(state_dict["param_groups"])
        super().load_state_dict({**state_dict, "state": {}})
        for group in self.param_groups:  # a checkpoint from an older version lacks the newer keys
            if "rank" in group:
                _fill_projection_defaults(group)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        groups = [g for g in self.param_groups for _ in g["params"]]
        by_id = dict(zip(ids, zip(params, groups)))
        for pid, saved in state_dict["state"].items():
            p, group = by_id[pid]
            device = dist_driver.local(p).device
            state = _to_device(_unshard(saved), device)
            if dist_driver.is_dtensor(p):
                layout = self._layout(p, group)
                for key in self._row_sharded_keys(p, group):
                    value = state.get(key)
                    if value is not None and value.shape[0] == layout.global_rows != layout.rows:
                        state[key] = value[layout.start: layout.start + layout.rows].clone()
            self.state[p] = state
        self._projectors.clear()  # rebuilt from the loaded state at their next use


def _without_data(tensor: torch.Tensor) -> bool:
    """Meta or fake tensors (state sizing, memory estimation): no value can be read, every gradient counts as
    finite."""
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type == "meta" or is_fake(tensor)


def _chunks(params: list[torch.Tensor], max_numel: int) -> list[list[int]]:
    """Consecutive index runs of ``params`` with at most ``max_numel`` elements each (or one parameter)."""
    chunks, size = [], max_numel
    for i, p in enumerate(params):
        if size + p.numel() > max_numel:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += p.numel()
    return chunks


def _zero_where_skipped(tensors: list[torch.Tensor], oks: list[torch.Tensor]) -> None:
    """Zero, in place, the tensors whose step is skipped (a NaN gradient must not reach the moments)."""
    for tensor, ok in zip(tensors, oks):
        if tensor.device.type != "meta":
            tensor.masked_fill_(ok == 0, 0.0)


def _local_basis(projector, layout) -> torch.Tensor:
    """The basis rows this rank needs: all of it, except a left projection of a row shard (its rows only)."""
    basis = projector.basis()
    if projector.side == "left" and layout.sharded:
        return basis[layout.start: layout.start + layout.rows]
    return basis


def _project_back(side: str, basis: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    basis = basis.to(low.dtype)
    return basis @ low if side == "left" else low @ basis.T


def _project_back_rows(side: str, basis: torch.Tensor, rows: slice, low: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``project_back(low)``, computed for those rows only."""
    return _project_back(side, basis, low[rows]) if side == "right" else _project_back(side, basis[rows], low)


def _unshard(value):
    if dist_driver.is_dtensor(value):
        return value.to_local()
    if isinstance(value, dict):
        return {k: _unshard(v) for k, v in value.items()}
    return value


def _add_projected_back(p: torch.Tensor, side: str, basis: torch.Tensor, low: torch.Tensor, alpha: float) -> None:
    """``p += alpha * project_back(low)`` as one ``addmm_``: no full-size temporary per parameter."""
    basis = basis.to(p.dtype)
    if side == "left":
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


def optimizer_state_bytes_of(value) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or nested dicts / lists of them); meta tensors count too."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(optimizer_state_bytes_of(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(optimizer_state_bytes_of(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer) -> int:
    """Exact bytes of every tensor in ``optimizer.state`` (moments, 8-bit codes and scales, projector tensors).

    Meta tensors count by shape and dtype, so call ``optimizer.init_state()`` on a meta-device model to size state
    without allocating it.
    """
    return sum(optimizer_state_bytes_of(state) for state in optimizer.state.values())
