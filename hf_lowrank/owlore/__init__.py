"""OwLore (Li et al., 2024, arXiv 2405.18380): outlier-weighted layer sampling + GaLore, and LISA as its baseline.

>>> ratios = compute_outlier_ratios(model, calibration_batches, M=5)
>>> optimizer, callback = setup(model, args, ratios=ratios, gamma=2, interval=20, rank=8)
>>> Trainer(model=model, args=args, optimizers=(optimizer, None), callbacks=[callback], ...).train()

``sampling="uniform"`` (no ratios needed) is LISA.
"""
from .callback import OwLoreCallback, block_probabilities, sample_blocks, unfreeze_all_blocks
from .config import SAMPLINGS, OwLoreConfig
from .outliers import compute_outlier_ratios, find_blocks, load_ratios, save_ratios


def setup(model, args=None, *, ratios=None, gamma: int = 5, interval: int = 50, sampling: str = "owl",
          seed: int = 0, blocks: str | None = None, train_outside_blocks: bool = True, mode: str = "galore",
          layerwise: bool = False, **optimizer_options):
    """``(optimizer, callback)`` for ``Trainer(optimizers=(optimizer, None), callbacks=[callback])``.

    Every block is made trainable first, so the optimizer holds all of them (the callback freezes all but γ at
    step 0); ``mode`` and ``optimizer_options`` go to :func:`hf_lowrank.create_optimizer` (GaLore inside the
    sampled blocks by default: ``rank``, ``update_proj_gap``, ``scale``, any projector mode). ``args`` (a
    ``TrainingArguments``) gives ``lr`` and ``weight_decay`` unless passed.
    """
    from ..optim import create_optimizer

    callback = OwLoreCallback(gamma=gamma, interval=interval, sampling=sampling, ratios=ratios, seed=seed,
                              blocks=blocks, train_outside_blocks=train_outside_blocks)
    _, block_list = find_blocks(model, blocks)
    callback.probabilities(len(block_list))  # gamma and ratios checked before anything changes
    if args is not None:
        optimizer_options.setdefault("lr", args.learning_rate)
        optimizer_options.setdefault("weight_decay", args.weight_decay)
    unfreeze_all_blocks(model, blocks)
    optimizer = create_optimizer(model, mode, layerwise=layerwise, **optimizer_options)
    return optimizer, callback


__all__ = ["OwLoreCallback", "OwLoreConfig", "SAMPLINGS", "block_probabilities", "compute_outlier_ratios",
           "find_blocks", "load_ratios", "sample_blocks", "save_ratios", "setup", "unfreeze_all_blocks"]
