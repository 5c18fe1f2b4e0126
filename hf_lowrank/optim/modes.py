"""The mode registry: a mode is projector x inner optimizer x moment policy x residual rule x refresh policy
(+ defaults).

Later methods add modes with :func:`register_mode`; :func:`create_optimizer` looks names up here.
"""
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..projectors import PROJECTORS
from .inner import INNER_OPTIMIZERS
from .refresh import REFRESH_POLICIES


MOMENT_POLICIES = ("keep", "reset", "rotate")
RESIDUALS = ("none", "signsgd", "sgd")


@dataclass(frozen=True)
class ModeSpec:
    """What one optimizer mode is made of.

    ``projector=None`` means no projection at all (full-rank baseline); ``defaults`` are option values (``rank``,
    ``density``, ``scale``, ``update_proj_gap``, inner or projector options) used unless the caller passes them.
    """

    projector: str | None = field(metadata={"help": "Projector registry name ('svd', 'dct', ...) or None."})
    inner: str = field(default="adamw", metadata={"help": "Inner optimizer: 'adamw', 'adamw8bit', 'adafactor'."})
    moment_policy: str = field(default="keep", metadata={"help": "On refresh: 'keep', 'reset' or 'rotate'."})
    residual: str = field(default="none", metadata={"help": "Out-of-subspace gradient: 'none', 'signsgd', 'sgd'."})
    refresh: str = field(default="fixed", metadata={"help": "When subspaces refresh: 'fixed' gap or Q-GaLore's 'lazy'."})
    quantized_weights: bool = field(default=False, metadata={
        "help": "Projected weights are quantized (have an update sink): the model must be prepared first."})
    defaults: Mapping[str, Any] = field(default_factory=dict, metadata={"help": "Default option values."})
    description: str = field(default="", metadata={"help": "One line for docs and listings."})

    def __post_init__(self):
        if self.projector is not None and self.projector not in PROJECTORS:
            raise ValueError(f"ModeSpec `projector`={self.projector!r}; available: {sorted(PROJECTORS)} or None.")
        if self.inner not in INNER_OPTIMIZERS:
            raise ValueError(f"ModeSpec `inner`={self.inner!r}; available: {sorted(INNER_OPTIMIZERS)}.")
        if self.moment_policy not in MOMENT_POLICIES:
            raise ValueError(f"ModeSpec `moment_policy`={self.moment_policy!r}; use one of {list(MOMENT_POLICIES)}.")
        if self.residual not in RESIDUALS:
            raise ValueError(f"ModeSpec `residual`={self.residual!r}; use one of {list(RESIDUALS)}.")
        if self.refresh not in REFRESH_POLICIES:
            raise ValueError(f"ModeSpec `refresh`={self.refresh!r}; use one of {list(REFRESH_POLICIES)}.")
        if self.moment_policy == "rotate" and not INNER_OPTIMIZERS[self.inner].supports_rotate:
            raise ValueError(f"ModeSpec: inner {self.inner!r} cannot rotate its moments; use 'keep' or 'reset'.")


_MODES: dict[str, ModeSpec] = {}


def register_mode(name: str, spec: ModeSpec, *, overwrite: bool = False) -> None:
    """Add a mode under ``name`` (raises if taken unless ``overwrite=True``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Mode name must be a non-empty string, got {name!r}.")
    if not isinstance(spec, ModeSpec):
        raise TypeError(f"register_mode({name!r}, spec): `spec` must be a ModeSpec, got {type(spec).__name__}.")
    if name in _MODES and not overwrite:
        raise ValueError(f"Mode {name!r} is already registered; pass overwrite=True to replace it.")
    _MODES[name] = spec


def available_modes() -> list[str]:
    return sorted(_MODES)


def get_mode(name: str) -> ModeSpec:
    if name not in _MODES:
        raise ValueError(f"Unknown optimizer mode {name!r}. Available modes: {', '.join(available_modes())}.")
    return _MODES[name]


# GaLore's pre-training defaults: the one place they are written (ProjectedOptimizer's group defaults too).
GALORE_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25}

for _name, _spec in {
    "adamw": ModeSpec(None, description="Full-rank AdamW (baseline, same update formula as GaLore's)."),
    "adamw_8bit": ModeSpec(None, inner="adamw8bit", description="Full-rank AdamW with 8-bit block-wise state."),
    "galore": ModeSpec("svd", defaults=GALORE_DEFAULTS, description="GaLore: exact SVD subspace, AdamW (Zhao et al. 2024)."),
    "galore_8bit": ModeSpec("svd", inner="adamw8bit", defaults=GALORE_DEFAULTS, description="GaLore with 8-bit AdamW state."),
    "galore_adafactor": ModeSpec("svd", inner="adafactor", defaults=GALORE_DEFAULTS, description="GaLore with Adafactor."),
    "galore_randomized": ModeSpec("randomized", defaults=GALORE_DEFAULTS, description="GaLore, randomized SVD (GaLore 2)."),
    "galore_dct": ModeSpec("dct", defaults=GALORE_DEFAULTS, description="SVD-free DCT column selection (Modoranu et al.)."),
    "galore_dct_8bit": ModeSpec("dct", inner="adamw8bit", defaults=GALORE_DEFAULTS, description="DCT basis + 8-bit state."),
    "galore_random": ModeSpec("random", defaults=GALORE_DEFAULTS, description="Seeded random orthonormal subspace."),
    "galore_subspace": ModeSpec("subspace", defaults=GALORE_DEFAULTS,
                                description="GaLore refreshed by warm-started subspace iteration (exact SVD once)."),
    "q_galore": ModeSpec(
        "svd", inner="adamw8bit", refresh="lazy", quantized_weights=True,
        defaults={**GALORE_DEFAULTS, "quant_bits": 4, "quant_group_size": 256},
        description="Q-GaLore: INT8 weights (stochastic rounding), INT4 SVD projectors, 8-bit AdamW, lazy "
                    "layer-adaptive refresh (Zhang et al. 2024); prepare_model_for_qgalore first.",
    ),
    "frugal": ModeSpec(
        "svd", moment_policy="reset", residual="signsgd",
        defaults={"density": 0.25, "update_proj_gap": 200, "scale": 1.0, "residual_lr_scale": 1.0},
        description="FRUGAL: AdamW in an SVD subspace (density 0.25, reset) + signSGD outside (Zmushko et al. 2025).",
    ),
}.items():
    register_mode(_name, _spec)
