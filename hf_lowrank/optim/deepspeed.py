"""DeepSpeed ZeRO-1/2 with hf_lowrank optimizers, projected modes included.

ZeRO-1/2 flattens each parameter group into one buffer, splits it into equal contiguous partitions (one per
rank, cutting matrices anywhere, even mid-row) and hands the wrapped optimizer only this rank's partition, as one
1-D parameter per group. :func:`attach_zero` reads where each matrix lies in the flat buffer from DeepSpeed's
ZeRO optimizer and tells the ProjectedOptimizer, which then projects each matrix from the pieces the ranks hold
(one all-reduce of its low-rank gradient per step; refreshes gather the matrix on its owner rank).

    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=create_optimizer(model, "galore"),
                                                        config={..., "zero_allow_untested_optimizer": True})
    attach_zero(zero_optimizer)

With ``Trainer`` add :class:`DeepSpeedZeroCallback` (it attaches before the first step). Without the attachment a
projected group stops with a clear error at its first step. ZeRO-3, layer-wise updates and DeepSpeed's CPU
offload are not supported (each raises here).
"""
import torch.distributed as dist
from transformers import TrainerCallback

from ..utils.wrappers import find_optimizer
from .distributed import FlatPartition, assign_owners
from .optimizer import ProjectedOptimizer


def _find_zero_optimizer(optimizer):
    """DeepSpeed's ZeRO-1/2 optimizer inside ``optimizer`` (through accelerate's / Trainer's wrappers)."""
    found = find_optimizer(optimizer, lambda o: hasattr(o, "round_robin_bit16_groups")
                           or type(o).__name__ == "DeepSpeedZeroOptimizer_Stage3")
    if type(found).__name__ == "DeepSpeedZeroOptimizer_Stage3":
        raise NotImplementedError("hf_lowrank optimizers support DeepSpeed ZeRO stages 1 and 2, not ZeRO-3.")
    return found


def attach_zero(optimizer) -> ProjectedOptimizer:
    """Describe DeepSpeed ZeRO-1/2's flat partitions to the hf_lowrank optimizer inside ``optimizer`` (the ZeRO
    optimizer ``deepspeed.initialize`` returns, ``engine.optimizer``, or a wrapper of it). Idempotent."""
    zero = _find_zero_optimizer(optimizer)
    if zero is None:
        raise TypeError(f"attach_zero: no DeepSpeed ZeRO-1/2 optimizer found in {type(optimizer).__name__}.")
    inner = zero.optimizer
    if not isinstance(inner, ProjectedOptimizer):
        raise TypeError(
            f"attach_zero: DeepSpeed wraps a {type(inner).__name__}, not an hf_lowrank ProjectedOptimizer "
            "(layer-wise optimizers are not supported under DeepSpeed: use layerwise=False)."
        )
    if getattr(zero, "cpu_offload", False):
        raise NotImplementedError("attach_zero: DeepSpeed's optimizer CPU offload is not supported with hf_lowrank.")
    originals = inner.original_parameters
    for index, group in enumerate(inner.param_groups):
        (flat,) = group["params"]
        params = zero.round_robin_bit16_groups[index]
        missing = [tuple(p.shape) for p in params if id(p) not in originals]
        if missing:
            raise ValueError(f"attach_zero: group {index} holds parameters the optimizer was not built with "
                             f"(shapes {missing[:3]}); build it on the model given to deepspeed.initialize.")
        process_group = zero.real_dp_process_group[index]
        world_size = dist.get_world_size(process_group)
        matrices = [(originals[id(p)], tuple(p.shape), offset) for p, offset
                    in zip(params, zero.round_robin_bit16_offsets[index]) if p.dim() == 2]
        if "rank" in group and len(matrices) != len(params):
            raise ValueError(f"attach_zero: projected group {index} holds non-matrix parameters.")
        if group["inner"] == "adafactor" and matrices and "rank" not in group:
            raise NotImplementedError(
                "attach_zero: inner='adafactor' factors the second moment of each matrix over its rows and columns, "
                "which a flat ZeRO partition does not have (it would silently become unfactored). Use an AdamW mode "
                "under DeepSpeed, or DDP / FSDP2 with this mode."
            )
        partition = FlatPartition(process_group, dist.get_rank(process_group), world_size,
                                  int(zero.partition_size[index]), matrices,
                                  assign_owners([shape for _, shape, _ in matrices], world_size))
        if flat.numel() != partition.partition_size:
            raise ValueError(f"attach_zero: group {index}'s partition has {flat.numel()} elements, DeepSpeed reports "
                             f"{partition.partition_size}; this DeepSpeed version lays partitions out differently.")
        inner.use_flat_partition(flat, partition)
    return inner


class DeepSpeedZeroCallback(TrainerCallback):
    """Calls :func:`attach_zero` on the Trainer's optimizer before training when DeepSpeed ZeRO-1/2 wraps it
    (a no-op otherwise)."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and _find_zero_optimizer(optimizer) is not None:
            attach_zero(optimizer)
