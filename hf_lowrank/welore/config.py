"""Configuration of WeLore (Jaiswal et al., 2024, "From GaLore to WeLore", arXiv:2407.11239)."""
from dataclasses import dataclass, field
from typing import Optional, Union

from ..utils.targets import normalize_target_modules


LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("welore", "uniform")
SVD_DTYPES = ("float32", "float64")


@dataclass
class WeLoreConfig:
    """How to compress a model with WeLore and which parts stay trainable.

    Args:
        target_modules (`str` or `list[str]`, defaults to the 7 LLaMA projections):
            Linear layers considered for rank reduction, with transformers' ``optim_target_modules``
            semantics (``"all-linear"``, a full-match regex, or names/substrings). ``"all-linear"`` skips the
            output embedding (``lm_head``). For BERT-style models use e.g.
            ``["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]``.
        rank_reduction (`float`, *optional*):
            Target effective rank reduction ρ = Σ dropped ranks / Σ ranks over the targeted matrices
            (0.5 = half of all ranks removed). WeLore finds the single global threshold τ reaching it by
            bisection. Give exactly one of ``rank_reduction`` and ``threshold``.
        threshold (`float`, *optional*):
            The global threshold τ on min–max normalised singular values, when you already know it
            (e.g. from an earlier run's ``hf_lowrank_config.json``). Singular values with ŝ < τ are dropped.
        method (`str`, defaults to ``"welore"``):
            ``"welore"`` (one global τ: heavy-tailed matrices lose many ranks, flat ones few) or
            ``"uniform"`` (every matrix loses ⌊ρ·rank⌋; the baseline of the paper).
        min_ratio (`float`, defaults to 0.4999):
            A matrix becomes a low-rank component (LRC, replaced by trainable factors) only when its dropped
            fraction exceeds this. 0.4999 (the paper's fine-tuning value) keeps exactly the matrices whose
            factors are smaller than the dense weight; 0.0 compresses every matrix that loses a rank
            (compression only). Other matrices stay dense and frozen.
        rank_pattern (`dict[str, int]`):
            Regex (matched against the end of a module name) → rank k, overriding the search for those
            modules; they are left out of the τ search and of ρ.
        modules_to_save (`list[str]`):
            Modules trained in full and saved next to the factors, e.g. ``["classifier"]`` for a new head.
        svd_dtype (`str`, defaults to ``"float32"``):
            Precision of the singular value decompositions (``"float64"`` for very ill-conditioned weights).
    """

    target_modules: Union[str, list[str]] = field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        metadata={"help": "Linear layers to consider: 'all-linear', a full-match regex, or names/substrings."},
    )
    rank_reduction: Optional[float] = field(
        default=None, metadata={"help": "Target effective rank reduction ρ in (0, 1); τ is found by bisection."}
    )
    threshold: Optional[float] = field(
        default=None, metadata={"help": "Global threshold τ in (0, 1] on min-max normalised singular values."}
    )
    method: str = field(
        default="welore", metadata={"help": "'welore' (global τ) or 'uniform' (⌊ρ·rank⌋ each)."}
    )
    min_ratio: float = field(
        default=0.4999,
        metadata={"help": "Factorise only if the dropped fraction exceeds this (0.4999 fine-tune, 0 compress)."},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Regex (module-name suffix) -> rank k overrides."}
    )
    modules_to_save: list[str] = field(
        default_factory=list, metadata={"help": "Modules trained in full and saved, e.g. ['classifier']."}
    )
    svd_dtype: str = field(default="float32", metadata={"help": "SVD precision: 'float32' or 'float64'."})

    def __post_init__(self):
        self.target_modules = normalize_target_modules(self.target_modules)
        if self.method not in METHODS:
            raise ValueError(f"`method`={self.method!r} is not supported; use one of {list(METHODS)}.")
        if (self.rank_reduction is None) == (self.threshold is None):
            raise ValueError("Give exactly one of `rank_reduction` (e.g. 0.5) and `threshold` (e.g. 0.135).")
        if self.rank_reduction is not None and not 0.0 < self.rank_reduction < 1.0:
            raise ValueError(f"`rank_reduction` must be in (0, 1), got {self.rank_reduction}.")
        if self.threshold is not None:
            if self.method == "uniform":
                raise ValueError("`method='uniform'` needs `rank_reduction`, not `threshold`.")
            if not 0.0 < self.threshold <= 1.0:
                raise ValueError(f"`threshold` must be in (0, 1], got {self.threshold}.")
        if not 0.0 <= self.min_ratio < 1.0:
            raise ValueError(f"`min_ratio` must be in [0, 1): 0.4999 for fine-tuning, 0.0 for compression only.")
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"`rank_pattern[{pattern!r}]` must be a positive int, got {rank!r}.")
        self.modules_to_save = list(self.modules_to_save or [])
        if self.svd_dtype not in SVD_DTYPES:
            raise ValueError(f"`svd_dtype`={self.svd_dtype!r} is not supported; use one of {list(SVD_DTYPES)}.")
