"""Configuration of GradNormLoRP (Huang et al., 2024, arXiv:2412.19616)."""
from dataclasses import dataclass, field
from typing import Union

from ..projectors import PROJ_TYPES, PROJECTORS
from ..utils.targets import normalize_target_modules
from ..welore.config import LLAMA_PROJECTIONS


@dataclass
class GradNormLoRPConfig:
    """Weight-normalised fine-tuning with low-rank projected direction gradients.

    Args:
        target_modules (`str` or `list[str]`, defaults to the 7 LLaMA projections):
            Linear layers reparameterised as ``W = m ⊙ V/‖V‖`` (transformers' ``optim_target_modules``
            semantics; ``"all-linear"`` skips the output embedding).
        rank (`int`, defaults to 8):
            Rank of the projected gradient of each direction ``V``: its AdamW state is ``rank × n`` (or
            ``m × rank``) instead of ``m × n``. The paper's GLUE runs use 8.
        update_proj_gap (`int`, defaults to 500):
            Steps between projector refreshes (GaLore's GLUE setting; 200 for pre-training).
        scale (`float`, defaults to 2.0):
            GaLore's α multiplying the projected update (2 with rank 8 on GLUE, GaLore Table 7).
        proj_type (`str`, defaults to ``"std"``): which side is projected (``hf_lowrank.projectors`` rule).
        projector (`str`, defaults to ``"svd"``): subspace choice, a ``hf_lowrank.projectors`` registry name.
        modules_to_save (`list[str]`): modules trained in full and saved too, e.g. ``["classifier"]``.
    """

    target_modules: Union[str, list[str]] = field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        metadata={"help": "Linear layers to reparameterise: 'all-linear', a full-match regex, or names/substrings."},
    )
    rank: int = field(default=8, metadata={"help": "Rank of the projected direction gradients."})
    update_proj_gap: int = field(default=500, metadata={"help": "Steps between projector refreshes."})
    scale: float = field(default=2.0, metadata={"help": "GaLore's α on the projected update."})
    proj_type: str = field(default="std", metadata={"help": f"Projected side: one of {list(PROJ_TYPES)}."})
    projector: str = field(default="svd", metadata={"help": "Projector registry name ('svd', 'randomized', ...)."})
    modules_to_save: list[str] = field(
        default_factory=list, metadata={"help": "Modules trained in full and saved, e.g. ['classifier']."}
    )

    def __post_init__(self):
        self.target_modules = normalize_target_modules(self.target_modules)
        for name in ("rank", "update_proj_gap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if not isinstance(self.scale, (int, float)) or self.scale <= 0:
            raise ValueError(f"`scale` must be > 0, got {self.scale!r}.")
        if self.proj_type not in PROJ_TYPES:
            raise ValueError(f"`proj_type`={self.proj_type!r} is not supported; use one of {list(PROJ_TYPES)}.")
        if self.projector not in PROJECTORS:
            raise ValueError(f"`projector`={self.projector!r} is unknown; available: {sorted(PROJECTORS)}.")
        self.modules_to_save = list(self.modules_to_save or [])
