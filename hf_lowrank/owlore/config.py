"""Configuration of OwLore (Li et al., 2024, arXiv 2405.18380) and its baseline LISA (uniform layer sampling)."""
from dataclasses import dataclass, field


SAMPLINGS = ("owl", "uniform", "owl_reverse")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class OwLoreConfig:
    """Which transformer blocks train, and when they are resampled.

    Args:
        gamma (`int`, defaults to 5): blocks trained at a time (OwLore's scripts: 5; LISA's LMFlow default: 2).
        interval (`int`, defaults to 50): steps between resamples (OwLore: 50; LISA: 20); the first sample is
            drawn at step 0.
        sampling (`str`, defaults to ``"owl"``): ``"owl"`` draws block l with probability ratio_l / Σ ratio
            (more outliers: more likely), ``"uniform"`` is LISA, ``"owl_reverse"`` uses 1 / ratio_l (an ablation).
        seed (`int`, defaults to 0): the sample of window w is drawn from a generator seeded with (seed, w), so a
            resumed run draws the same blocks with no saved RNG state.
    """

    gamma: int = field(default=5, metadata={"help": "Blocks trained at a time."})
    interval: int = field(default=50, metadata={"help": "Steps between resamples."})
    sampling: str = field(default="owl", metadata={"help": f"Block sampling: one of {list(SAMPLINGS)}."})
    seed: int = field(default=0, metadata={"help": "Seed of the block sampling."})

    def __post_init__(self):
        if not _is_int(self.gamma) or self.gamma < 1:
            raise ValueError(f"OwLoreConfig: `gamma` (blocks trained at a time) must be an int >= 1, got {self.gamma!r}.")
        if not _is_int(self.interval) or self.interval < 1:
            raise ValueError(f"OwLoreConfig: `interval` (steps between resamples) must be an int >= 1, got "
                             f"{self.interval!r}.")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"OwLoreConfig: `sampling`={self.sampling!r}; use one of {list(SAMPLINGS)} "
                             "('uniform' is LISA).")
        if not _is_int(self.seed):
            raise ValueError(f"OwLoreConfig: `seed` must be an int, got {self.seed!r}.")
