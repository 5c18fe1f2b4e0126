"""WeLore surgery: one data-agnostic SVD pass picks per-matrix ranks, low-rank components become factors.

Algorithm (WeLore, arXiv:2407.11239, checked against the authors' ``utils.adaptive_rank_pruning`` and
``lib/rank_reduction.py``): for every targeted weight take its singular values ``s``, min–max normalise them
(``ŝ = (s - min s) / (max s - min s)``) and drop the ranks with ``ŝ < τ`` for ONE global τ. A matrix whose
dropped fraction exceeds ``min_ratio`` is a low-rank component (LRC) and is replaced by balanced SVD factors;
the others keep their original dense weight, frozen. Unlike the reference code (a hand-made τ table for
two model names) τ is found here by bisection for any model, on the *effective* reduction ρ = Σ dropped
ranks of the replaced matrices / Σ ranks of all searched matrices.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import logging

from ..tuners import TunerModel, modules_to_save_names, set_trainable
from ..utils.targets import find_target_linears, is_conv1d, linear_weight
from .config import WeLoreConfig
from .layer import WeLoreLinear, svd_factors


logger = logging.get_logger(__name__)

FACTORS, TRUNCATED = "factors", "truncated"


@dataclass
class LayerPlan:
    """Rank decision for one targeted ``out×in`` matrix: keep ``rank`` of its ``full_rank`` singular values."""

    shape: tuple[int, int]
    full_rank: int
    rank: int
    min_ratio: float
    searched: bool = True  # False when the rank came from `rank_pattern`

    @property
    def dropped(self) -> int:
        return self.full_rank - self.rank

    @property
    def is_lrc(self) -> bool:
        return self.dropped > 0 and self.dropped / self.full_rank > self.min_ratio

    @property
    def format(self) -> str | None:
        """``"factors"`` when U,V are smaller than W; ``"truncated"`` (dense rank-k weight) otherwise."""
        if not self.is_lrc:
            return None
        out_features, in_features = self.shape
        return FACTORS if self.rank * (out_features + in_features) < out_features * in_features else TRUNCATED


def normalized_spectrum(weight: torch.Tensor, svd_dtype: torch.dtype) -> torch.Tensor:
    """Min–max normalised singular values, ascending. A flat spectrum normalises to all ones (nothing dropped)."""
    s = torch.linalg.svdvals(weight.detach().to(svd_dtype)).flip(0)
    span = s[-1] - s[0]
    return torch.ones_like(s) if span <= 0 else (s - s[0]) / span


def effective_reduction(spectra: dict[str, torch.Tensor], threshold: float, min_ratio: float) -> float:
    """ρ(τ): ranks dropped by the matrices that become LRCs at threshold τ, over all ranks."""
    dropped = total = 0
    for s in spectra.values():
        drop = int(torch.searchsorted(s, s.new_tensor(threshold)))
        dropped += drop if drop / len(s) > min_ratio else 0
        total += len(s)
    return dropped / total


def find_threshold(spectra: dict[str, torch.Tensor], rank_reduction: float, min_ratio: float) -> float:
    """Bisection for the global τ whose effective reduction is closest to `rank_reduction`.

    ρ(τ) is a non-decreasing step function that only changes at the normalised singular values, so the
    search runs over those values (exact, ~log2 Σrank evaluations). The returned τ lies midway between
    two neighbouring values, so re-applying it as ``threshold`` reproduces the same ranks.
    """
    candidates = torch.unique(torch.cat([s.double() for s in spectra.values()]))
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if effective_reduction(spectra, float(candidates[mid]), min_ratio) >= rank_reduction:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0:
        above = effective_reduction(spectra, float(candidates[lo]), min_ratio)
        below = effective_reduction(spectra, float(candidates[lo - 1]), min_ratio)
        if abs(below - rank_reduction) < abs(above - rank_reduction):
            lo -= 1
    return float(candidates[lo] + candidates[lo - 1]) / 2 if lo > 0 else float(candidates[0]) / 2


class WeLoreModel(TunerModel):
    """A transformers model compressed by WeLore (surgery in place: pass ``.model`` or the original object to
    ``Trainer``). Only the LRC factors (and ``modules_to_save``) are trainable."""

    method = "welore"

    def __init__(self, model: nn.Module, config: WeLoreConfig):
        if not isinstance(config, WeLoreConfig):
            raise TypeError(f"`config` must be a WeLoreConfig, got {type(config).__name__}.")
        super().__init__(model, config)
        self.plans: dict[str, LayerPlan] = {}
        self.threshold: float | None = config.threshold
        # effective ρ over the searched matrices (those not fixed by `rank_pattern`), set by `plan()`
        self.achieved_rank_reduction: float | None = None
        self.num_targeted = 0

    # --- planning ------------------------------------------------------------------------------------
    def _targets(self) -> list[tuple[str, nn.Module]]:
        return find_target_linears(self.model, self.tuner_config.target_modules)

    def _overrides(self, names: list[str]) -> dict[str, int]:
        overrides = {}
        for pattern, rank in self.tuner_config.rank_pattern.items():
            matched = [n for n in names if re.fullmatch(rf"(.*\.)?(?:{pattern})", n)]
            if not matched:
                raise ValueError(f"`rank_pattern` key {pattern!r} matches none of the targeted modules.")
            overrides.update(dict.fromkeys(matched, rank))
        return overrides

    def plan(self) -> dict[str, LayerPlan]:
        """Decide every targeted matrix's rank (one ``svdvals`` per matrix for ``method='welore'``)."""
        config = self.tuner_config
        svd_dtype = getattr(torch, config.svd_dtype)
        targets = self._targets()
        overrides = self._overrides([n for n, _ in targets])
        plans = {}
        for name, linear in targets:
            shape = tuple(linear_weight(linear).shape)
            rank = overrides.get(name, min(shape))
            if rank > min(shape):
                raise ValueError(f"`rank_pattern` gives {name} rank {rank} > its full rank {min(shape)}.")
            # overridden ranks are the user's explicit choice: always applied
            searched = name not in overrides
            plans[name] = LayerPlan(shape, min(shape), rank, config.min_ratio if searched else 0.0, searched)
        searched = [(n, m) for n, m in targets if n not in overrides]
        if config.method == "uniform":
            for name, _ in searched:
                plans[name].rank -= int(config.rank_reduction * plans[name].full_rank)
        elif searched:
            spectra = {n: normalized_spectrum(m.weight, svd_dtype) for n, m in searched}
            if self.threshold is None:
                self.threshold = find_threshold(spectra, config.rank_reduction, config.min_ratio)
            for name, s in spectra.items():
                plans[name].rank -= int(torch.searchsorted(s, s.new_tensor(self.threshold)))
        self.plans, self.num_targeted = plans, len(plans)
        searched_plans = [p for p in plans.values() if p.searched]
        total = sum(p.full_rank for p in searched_plans)
        self.achieved_rank_reduction = sum(p.dropped for p in searched_plans if p.is_lrc) / total if total else 0.0
        return plans

    # --- surgery -------------------------------------------------------------------------------------
    def compress(self) -> "WeLoreModel":
        plans = self.plan()
        svd_dtype = getattr(torch, self.tuner_config.svd_dtype)
        for name, plan in plans.items():
            linear = self.model.get_submodule(name)
            if plan.format == FACTORS:
                self.model.set_submodule(name, WeLoreLinear.from_linear(linear, plan.rank, svd_dtype))
            elif plan.format == TRUNCATED:
                up, down = svd_factors(linear.weight, plan.rank, svd_dtype)
                with torch.no_grad():
                    linear_weight(linear).copy_(up @ down)
        self._freeze()
        lrcs = sum(p.is_lrc for p in plans.values())
        if self.tuner_config.rank_reduction is not None and self.tuner_config.method == "welore":
            achieved = self.achieved_rank_reduction
            if abs(achieved - self.tuner_config.rank_reduction) > 0.01:
                logger.warning(f"WeLore reached rank reduction {achieved:.3f} instead of "
                               f"{self.tuner_config.rank_reduction}: too few targeted matrices for min_ratio; "
                               "lower min_ratio or target more modules.")
        logger.info(f"WeLore: τ={self.threshold}, {lrcs}/{len(plans)} matrices are LRCs, "
                    f"effective rank reduction {self.achieved_rank_reduction:.3f}.")
        return self

    def _freeze(self) -> None:
        trainable = {n for n, _ in self.model.named_parameters() if n.endswith((".welore_U", ".welore_V"))}
        set_trainable(self.model, trainable | modules_to_save_names(self.model, self.tuner_config.modules_to_save))

    def layout(self) -> dict:
        return {
            "threshold": self.threshold,
            "achieved_rank_reduction": self.achieved_rank_reduction,
            "num_targeted": self.num_targeted,
            "layers": {n: {"rank": p.rank, "full_rank": p.full_rank, "format": p.format}
                       for n, p in self.plans.items() if p.is_lrc},
        }

    def _apply_layout(self, layout: dict) -> None:
        self.threshold = layout["threshold"]
        self.achieved_rank_reduction = layout["achieved_rank_reduction"]
        self.num_targeted = layout["num_targeted"]
        for name, entry in layout["layers"].items():
            linear = self.model.get_submodule(name)
            shape = tuple(linear_weight(linear).shape)
            self.plans[name] = LayerPlan(shape, entry["full_rank"], entry["rank"], min_ratio=0.0)
            if entry["format"] == FACTORS:
                self.model.set_submodule(name, WeLoreLinear(
                    shape[1], shape[0], entry["rank"], bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device, conv1d=is_conv1d(linear)))
        self._freeze()

    def tuner_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of every changed layer (factors + bias, or the truncated weight) and of ``modules_to_save``."""
        state = {}
        for name, plan in self.plans.items():
            if plan.is_lrc:
                module = self.model.get_submodule(name)
                state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        params = dict(self.model.named_parameters())
        state.update({n: params[n] for n in modules_to_save_names(self.model, self.tuner_config.modules_to_save)})
        return state

    def lrc_parameter_names(self) -> list[str]:
        """Names (in ``.model``) of the trainable factors, e.g. for an optimizer's ``target_modules``."""
        return [n for n, _ in self.model.named_parameters() if n.endswith((".welore_U", ".welore_V"))]

    def projected_parameter_names(self) -> list[str]:
        """GaLore on the factors: ``create_optimizer(rank=...)`` projects the gradients of U and V."""
        return self.lrc_parameter_names()

    def merge_and_unload(self) -> nn.Module:
        """Replace every factor pair by a dense layer of the original type (``U @ V``) and return the plain
        transformers model, each parameter trainable as it was before the tuner froze it."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, WeLoreLinear):
                self.model.set_submodule(name, module.to_linear())
        self.restore_requires_grad()
        return self.model

    def card_details(self) -> list[str]:
        lrcs = [n for n, p in self.plans.items() if p.is_lrc]
        return [
            f"- WeLore ({self.tuner_config.method}): threshold τ = {self.threshold}, effective rank reduction "
            f"{self.achieved_rank_reduction:.1%}, {len(lrcs)}/{self.num_targeted} targeted matrices are low-rank "
            f"components (min_ratio {self.tuner_config.min_ratio})",
        ]


def compress(model: nn.Module, config: WeLoreConfig) -> WeLoreModel:
    """Compress `model` in place with WeLore and return the :class:`WeLoreModel` wrapping it."""
    return WeLoreModel(model, config).compress()
