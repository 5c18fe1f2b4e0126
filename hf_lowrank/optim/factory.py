"""``create_optimizer`` / ``optimizer_cls_and_kwargs`` / ``optimizer_factory``: a model + a mode name -> a ready
``ProjectedOptimizer`` (or its layer-wise wrapper)."""
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging

from ..projectors import projector_option_names, resolve_side
from ..utils.targets import find_target_linears, linear_types
from . import distributed as dist_driver
from .inner import INNER_OPTION_DEFAULTS
from .modes import get_mode
from .optimizer import PROJECTION_DEFAULTS, ProjectedOptimizer, _is_int
from .refresh import REFRESH_DEFAULTS
from .sinks import attach_update_sink, update_sink_of


logger = logging.get_logger(__name__)

# Options that shape the projected group (everything else is an inner, optimizer-level or projector option).
_GROUP_OPTIONS = ("rank", "density", "update_proj_gap", "scale", "residual_lr_scale",
                  *(k for k in REFRESH_DEFAULTS if k != "refresh"))
_SPEC_OPTIONS = ("projector", "inner", "moment_policy", "residual", "refresh")


def projectable_module_types(model: nn.Module) -> tuple[type, ...]:
    """The linear layer types (``nn.Linear``, ``Conv1D``) plus every module type in ``model`` that holds a quantized
    weight (``holds_quantized_weight = True``, or a ``weight`` with an update sink; e.g. Q-GaLore's), so
    ``target_modules`` (``'all-linear'`` too) matches them."""
    quantized = {type(m) for m in model.modules() if getattr(m, "holds_quantized_weight", False) or (
        isinstance(getattr(m, "weight", None), torch.Tensor) and update_sink_of(m.weight) is not None)}
    return (*linear_types(), *sorted(quantized, key=lambda t: t.__qualname__))


def optimizer_cls_and_kwargs(
    model: nn.Module,
    mode: str = "galore",
    *,
    target_modules="all-linear",
    projected_parameters: list[str] | None = None,
    rank: int | None = None,
    update_proj_gap: int | None = None,
    scale: float | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    proj_type: str = "std",
    **mode_options: Any,
) -> tuple[type, dict]:
    """``(ProjectedOptimizer, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; kwargs include ``params``.
    With ``layerwise=True`` it returns :func:`optimizer_factory`'s ``(OptimizerFactory, kwargs)`` instead, which
    ``Trainer`` calls with the model (a class cannot build a layer-wise optimizer from parameters alone).

    ``projected_parameters`` (parameter names) replaces ``target_modules`` for tuners whose projected tensors are
    not module weights (WeLore's factors, GradNormLoRP's directions). A matrix whose projected dimension is at most
    the rank gets the plain update instead (logged once): projecting it saves nothing and its projector costs extra.

    ``rank``/``update_proj_gap``/``scale`` left as ``None`` take the mode's defaults (GaLore modes: 128 / 200 / 0.25;
    ``frugal``: ``density`` 0.25 / 200 / 1.0). ``mode_options`` override the mode's parts (``projector``, ``inner``,
    ``moment_policy``, ``residual``) and set any option: ``density``, ``residual_lr_scale`` (FRUGAL's
    ``inactive_lr_scale`` is accepted as its name there), ``nonfinite``, inner options (``min_8bit_size``,
    ``block_size``, ``beta1``, ``decay_rate``, ``clip_threshold``, ``adafactor_eps``), ``distributed``
    (``ProjectedOptimizer``'s) and projector options
    (e.g. ``sign_convention``, ``seed``, ``oversample``, ``niter``, ``norm``, ``quant_bits``). Modes without a
    projector (``adamw``, ``adamw_8bit``) ignore ``rank``/``update_proj_gap``/``scale``/``density``, so one call
    can loop over every mode.
    """
    if "layerwise" in mode_options or "gradient_accumulation_steps" in mode_options:
        return optimizer_factory(mode, target_modules=target_modules, rank=rank, update_proj_gap=update_proj_gap,
                                 scale=scale, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                 proj_type=proj_type, **mode_options)
    spec = get_mode(mode)
    if "inactive_lr_scale" in mode_options:
        if "residual_lr_scale" in mode_options:
            raise ValueError("Pass either `residual_lr_scale` or FRUGAL's name for it, `inactive_lr_scale`, not both.")
        mode_options["residual_lr_scale"] = mode_options.pop("inactive_lr_scale")
    given = {k: v for k, v in {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale}.items() if v is not None}
    options = {**spec.defaults, **given, **mode_options}
    parts = {key: options.pop(key, getattr(spec, key)) for key in _SPEC_OPTIONS}
    nonfinite = options.pop("nonfinite", None)
    distributed = options.pop("distributed", "auto")
    adopt_saved_settings = options.pop("adopt_saved_settings", False)
    inner_options = {k: options.pop(k) for k in list(options) if k in INNER_OPTION_DEFAULTS}
    group_options = {k: options.pop(k) for k in list(options) if k in _GROUP_OPTIONS}
    if "density" in group_options and "rank" not in given and "rank" not in mode_options:
        group_options["rank"] = None  # FRUGAL: rank follows density
    if parts["projector"] is not None:
        allowed = projector_option_names(parts["projector"])
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            valid = sorted(set(_GROUP_OPTIONS) | set(_SPEC_OPTIONS) | set(INNER_OPTION_DEFAULTS) | set(allowed))
            raise ValueError(f"Unknown option(s) {unknown} for mode {mode!r}. Valid options: {valid} (and nonfinite, distributed, adopt_saved_settings).")
    elif options:
        valid = sorted(set(_SPEC_OPTIONS) | set(INNER_OPTION_DEFAULTS))
        raise ValueError(f"Unknown option(s) {sorted(options)} for mode {mode!r} (no projection). Valid: {valid}.")

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    if parts["projector"] is None:
        groups.append({"params": [p for _, p in trainable], "param_names": [n for n, _ in trainable]})
    elif projected_parameters is not None:
        unknown = sorted(set(projected_parameters) - {n for n, _ in trainable})
        if unknown:
            raise ValueError(f"`projected_parameters` names no trainable parameter: {unknown[:5]}.")
        named = set(projected_parameters)
        projected_ids = {id(p) for n, p in trainable if n in named and p.dim() == 2}
    else:
        targets = find_target_linears(model, target_modules, module_types=projectable_module_types(model))
        if spec.quantized_weights and not any(update_sink_of(m.weight) is not None for _, m in targets):
            if any(dist_driver.is_dtensor(p) for p in model.parameters()):
                raise ValueError(f"Mode {mode!r} trains quantized weights, which FSDP2 (fully_shard) cannot shard; "
                                 "train it under DDP or in one process.")
            raise ValueError(
                f"Mode {mode!r} trains quantized weights, but none of the {len(targets)} module(s) matched by "
                f"`target_modules`={target_modules!r} is quantized. Call hf_lowrank.prepare_model_for_qgalore(model) "
                "before building the optimizer (or use 'galore' / 'galore_8bit' for float weights)."
            )
        projected_ids = {id(m.weight) for _, m in targets if m.weight.requires_grad and m.weight.dim() == 2}
        if not projected_ids:
            raise ValueError(
                f"`target_modules`={target_modules!r} matched {len(targets)} linear module(s) but none has a "
                "trainable 2-D weight (frozen?). Unfreeze them or target other modules."
            )
    if parts["projector"] is not None:
        group_rank = group_options.get("rank", PROJECTION_DEFAULTS["rank"])
        full = [(n, p) for n, p in trainable if id(p) in projected_ids and _is_int(group_rank)
                and group_rank >= p.shape[0 if resolve_side(tuple(p.shape), proj_type) == "left" else 1]]
        if full:
            shown = ", ".join(n for n, _ in full[:4]) + (", ..." if len(full) > 4 else "")
            logger.warning(f"rank {group_rank} is at least the projected dimension of {len(full)} matri"
                           f"{'x' if len(full) == 1 else 'ces'} ({shown}): they get the plain update (projecting "
                           "them would cost more state than AdamW).")
            projected_ids -= {id(p) for _, p in full}
        plain = [(n, p) for n, p in trainable if id(p) not in projected_ids]
        projected = [(n, p) for n, p in trainable if id(p) in projected_ids]
        if plain:
            groups.append({"params": [p for _, p in plain], "param_names": [n for n, _ in plain]})
        projection = {
            **{k: v for k, v in PROJECTION_DEFAULTS.items() if k in ("rank", "density", "update_proj_gap", "scale")},
            **group_options,
            "proj_type": proj_type,
            "projector": parts["projector"],
            "projector_options": options,
            "moment_policy": parts["moment_policy"],
            "residual": parts["residual"],
            "refresh": parts["refresh"],
        }
        if projected:
            groups.append({"params": [p for _, p in projected], "param_names": [n for n, _ in projected], **projection})
    betas = tuple(betas) if isinstance(betas, (list, tuple)) else betas  # anything else: a clear error below
    kwargs = {"params": groups, "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
              "inner": parts["inner"], "nonfinite": nonfinite, "distributed": distributed,
              "adopt_saved_settings": adopt_saved_settings, **inner_options}
    if parts["projector"] is not None and not projected:  # the values are still checked, on a stand-in matrix
        ProjectedOptimizer(**{**kwargs, "params": [{"params": [torch.empty(2, 2, device="meta")], **projection}]})
    return ProjectedOptimizer, kwargs


def create_optimizer(model: nn.Module, mode: str = "galore", *, layerwise: bool = False,
                     gradient_accumulation_steps: int | None = None, **kwargs: Any):
    """Build the optimizer for ``model`` in ``mode`` (see :func:`optimizer_cls_and_kwargs` for every option).

    Only the 2-D ``weight`` of ``nn.Linear`` modules matched by ``target_modules`` (transformers'
    ``optim_target_modules`` semantics) is projected; every other trainable parameter gets the same inner optimizer
    unprojected, in the same optimizer object. ``layerwise=True`` steps each parameter inside backward
    (``hf_lowrank.optim.layerwise``; a non-finite gradient then skips that parameter, since a whole step cannot
    be skipped once some parameters are updated). ``model`` may be a DDP-wrapped or FSDP2-sharded model.
    """
    if not layerwise and gradient_accumulation_steps is not None:
        raise ValueError("`gradient_accumulation_steps` is a layer-wise option (layerwise=True); a normal optimizer "
                         "steps when the training loop calls step().")
    from .layerwise import unwrap_data_parallel

    cls, cls_kwargs = optimizer_cls_and_kwargs(unwrap_data_parallel(model), mode, **kwargs)
    optimizer = cls(**cls_kwargs)
    if layerwise:
        from .layerwise import make_layerwise

        return make_layerwise(optimizer, model, gradient_accumulation_steps=gradient_accumulation_steps)
    return optimizer


class OptimizerFactory:
    """transformers' optimizer-factory protocol: ``Trainer`` calls ``OptimizerFactory()(model, **kwargs)`` with the
    model it trains (FSDP2-sharded already when Accelerate shards before building the optimizer), so nothing
    holds parameter references made before Accelerate prepared the model, and layer-wise optimizers can be built."""

    def __call__(self, model: nn.Module, **kwargs: Any):
        return create_optimizer(model, **kwargs)


def optimizer_factory(mode: str = "galore", **options: Any) -> tuple[type, dict]:
    """``(OptimizerFactory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: the optimizer is built by
    ``Trainer`` from the model it trains. Takes every option of :func:`create_optimizer` (``layerwise=True`` too);
    the mode and option names are checked now, the target modules when ``Trainer`` builds it."""
    probe = {k: v for k, v in options.items() if k not in ("layerwise", "gradient_accumulation_steps",
                                                             "target_modules")}
    probe_model = nn.Linear(2, 2, device="meta")
    if get_mode(mode).quantized_weights:  # the probe stands in for a quantized linear; it is never stepped
        attach_update_sink(probe_model.weight, probe_model)
    optimizer_cls_and_kwargs(probe_model, mode, target_modules=[""], **probe)  # names and values
    return OptimizerFactory, {"mode": mode, **options}
