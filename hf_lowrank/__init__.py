"""hf_lowrank: memory-efficient training methods for the Hugging Face stack.

Top-level names are imported lazily so ``import hf_lowrank`` stays cheap and optional dependencies
(bitsandbytes, peft, ...) are only touched by the methods that need them.
"""
import importlib

from hf_lowrank.utils import imports as _imports  # noqa: F401  (keeps bitsandbytes' import-time warnings quiet)


__version__ = "0.1.0"

_LAZY = {
    "create_optimizer": "hf_lowrank.optim",
    "available_modes": "hf_lowrank.optim",
    "register_mode": "hf_lowrank.optim",
    "optimizer_state_bytes": "hf_lowrank.optim",
    "optimizer_cls_and_kwargs": "hf_lowrank.optim",
    "optimizer_factory": "hf_lowrank.optim",
    "NonFiniteLogCallback": "hf_lowrank.callbacks",
    "RefreshLogCallback": "hf_lowrank.callbacks",
    "ProjectedOptimizer": "hf_lowrank.optim",
    "ModeSpec": "hf_lowrank.optim",
    "make_layerwise": "hf_lowrank.optim.layerwise",
    "LayerwiseGradNormCallback": "hf_lowrank.callbacks",
    "TpSGDTrainer": "hf_lowrank.tpsgd",
    "TpSGDConfig": "hf_lowrank.tpsgd",
    "ContinualTrainer": "hf_lowrank.cuber",
    "ContinualConfig": "hf_lowrank.cuber",
    "WeLoreConfig": "hf_lowrank.welore",
    "GradNormLoRPConfig": "hf_lowrank.gradnormlorp",
    "load_tuner": "hf_lowrank.tuners",
    "QGaLoreConfig": "hf_lowrank.qgalore",
    "prepare_model_for_qgalore": "hf_lowrank.qgalore",
    "save_qgalore": "hf_lowrank.qgalore",
    "load_qgalore": "hf_lowrank.qgalore",
    "export_dense": "hf_lowrank.qgalore",
    "CoLMConfig": "hf_lowrank.colm",
    "CoLMTrainer": "hf_lowrank.colm",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_lowrank' has no attribute {name!r}")
