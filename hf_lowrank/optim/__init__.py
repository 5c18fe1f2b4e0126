"""Projected optimizers (GaLore family, FRUGAL) as one ``torch.optim.Optimizer`` built from a mode registry.

    from hf_lowrank.optim import create_optimizer
    opt = create_optimizer(model, "galore", target_modules="all-linear", rank=128, update_proj_gap=200, lr=1e-2)
"""
from .factory import OptimizerFactory, create_optimizer, optimizer_cls_and_kwargs, optimizer_factory
from .inner import INNER_OPTIMIZERS, InnerOptimizer
from .modes import MOMENT_POLICIES, RESIDUALS, ModeSpec, available_modes, get_mode, register_mode
from .optimizer import ProjectedOptimizer, optimizer_state_bytes


__all__ = [
    "INNER_OPTIMIZERS", "InnerOptimizer", "MOMENT_POLICIES", "ModeSpec", "OptimizerFactory", "ProjectedOptimizer",
    "RESIDUALS", "available_modes", "create_optimizer", "get_mode", "optimizer_cls_and_kwargs", "optimizer_factory",
    "optimizer_state_bytes",
    "register_mode",
]
