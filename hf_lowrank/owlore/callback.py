"""``OwLoreCallback``: train γ sampled blocks at a time, resampled every ``interval`` steps (OwLore / LISA)."""
import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from ..callbacks import find_projected_optimizer
from .config import OwLoreConfig
from .outliers import find_blocks


logger = logging.get_logger(__name__)


def block_probabilities(sampling: str, num_blocks: int, ratios=None) -> np.ndarray:
    """Sampling probability of each block: ∝ ratio (``owl``), ∝ 1 / ratio (``owl_reverse``) or uniform (LISA)."""
    if sampling == "uniform":
        return np.full(num_blocks, 1.0 / num_blocks)
    if ratios is None:
        raise ValueError(f"sampling={sampling!r} needs `ratios` (hf_lowrank.owlore.compute_outlier_ratios).")
    ratios = np.asarray(ratios, dtype=np.float64)
    if ratios.shape != (num_blocks,):
        raise ValueError(f"`ratios` has {ratios.size} values but the model has {num_blocks} blocks; compute them for "
                         "this model (compute_outlier_ratios).")
    if not np.all(np.isfinite(ratios)) or np.any(ratios <= 0):
        raise ValueError(f"`ratios` must all be > 0 (a block with ratio 0 could never be sampled), got {ratios.tolist()}.")
    weights = ratios if sampling == "owl" else 1.0 / ratios
    return weights / weights.sum()


def sample_blocks(probabilities: np.ndarray, gamma: int, seed: int, window: int) -> list[int]:
    """The γ blocks of resampling window ``window``, without replacement; a function of (seed, window) only."""
    generator = np.random.default_rng([seed, window])
    return sorted(generator.choice(len(probabilities), size=gamma, replace=False, p=probabilities).tolist())


class OwLoreCallback(TrainerCallback, ExportableState):
    """Freezes every block but γ sampled ones, resampling at step 0 and every ``interval`` steps; embeddings, the
    final norm and the head keep their ``requires_grad`` (they always train). The optimizer state of blocks that
    leave the sample is released (``release_state``), so state never exceeds the γ active blocks' plus the
    always-trained parts; a block sampled again starts from fresh state. Works with layer-wise optimizers, which
    hook newly trainable parameters before each forward.

    Args: see :class:`OwLoreConfig`; ``ratios`` (one per block, from :func:`compute_outlier_ratios`) for the
    ``owl`` samplings; ``blocks`` the attribute path of the block list when it is not a standard one;
    ``train_outside_blocks=False`` freezes every parameter outside the blocks (embeddings, final norm, head) for the
    whole run instead of training them.
    """

    def __init__(self, gamma: int = 5, interval: int = 50, sampling: str = "owl", ratios=None, seed: int = 0,
                 blocks: str | None = None, train_outside_blocks: bool = True):
        self.config = OwLoreConfig(gamma=gamma, interval=interval, sampling=sampling, seed=seed)
        if not isinstance(train_outside_blocks, bool):
            raise ValueError(f"OwLoreCallback: `train_outside_blocks` must be True or False, got "
                             f"{train_outside_blocks!r}.")
        self.ratios = None if ratios is None else [float(r) for r in ratios]
        self.blocks = blocks
        self.train_outside_blocks = train_outside_blocks
        self.window = None
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []  # (step, blocks) of every resample, for inspection

    def state(self) -> dict:
        c = self.config
        return {"args": {"gamma": c.gamma, "interval": c.interval, "sampling": c.sampling, "ratios": self.ratios,
                         "seed": c.seed, "blocks": self.blocks, "train_outside_blocks": self.train_outside_blocks},
                "attributes": {"window": self.window, "active": list(self.active)}}

    def probabilities(self, num_blocks: int) -> np.ndarray:
        if self.config.gamma > num_blocks:
            raise ValueError(f"OwLoreCallback: `gamma`={self.config.gamma} is more than the model's {num_blocks} blocks.")
        return block_probabilities(self.config.sampling, num_blocks, self.ratios)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.train_outside_blocks:
            _, block_list = find_blocks(model, self.blocks)
            inside = {id(p) for p in block_list.parameters()}
            for p in model.parameters():
                if id(p) not in inside:
                    p.requires_grad_(False)
        self._resample(state.global_step, model, kwargs.get("optimizer"), release=False)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._resample(state.global_step, model, kwargs.get("optimizer"), release=True)

    def _resample(self, step: int, model, optimizer, release: bool) -> None:
        window = step // self.config.interval
        if window == self.window and self.active:
            return
        _, block_list = find_blocks(model, self.blocks)
        active = sample_blocks(self.probabilities(len(block_list)), self.config.gamma, self.config.seed, window)
        left = [i for i in self.active if i not in active]
        for index, block in enumerate(block_list):
            keep = index in active
            for p in block.parameters():
                p.requires_grad_(keep)
                if not keep:
                    p.grad = None
        if release and left:
            projected = find_projected_optimizer(optimizer)
            if projected is not None:
                freed = projected.release_state([p for i in left for p in block_list[i].parameters()])
                logger.info(f"OwLore step {step}: blocks {active} active; released {freed} bytes of state of {left}.")
        self.window, self.active = window, active
        self.history.append((step, active))


def unfreeze_all_blocks(model, blocks=None) -> list[torch.nn.Parameter]:
    """Make every block parameter trainable (before building the optimizer, so it holds them all)."""
    _, block_list = find_blocks(model, blocks)
    params = [p for block in block_list for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params
