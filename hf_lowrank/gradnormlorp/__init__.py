"""GradNormLoRP: weight-normalised fine-tuning whose direction gradients are projected to low rank.

>>> from hf_lowrank.gradnormlorp import GradNormLoRPConfig, reparameterize_model
>>> gnl = reparameterize_model(model, GradNormLoRPConfig(rank=8))          # `model` is changed in place
>>> Trainer(model=model, optimizer_cls_and_kwargs=gnl.optimizer_cls_and_kwargs(lr=2e-5), ...).train()
>>> dense = gnl.merge_and_unload()
"""
from ..tuners import register_tuner
from .config import GradNormLoRPConfig
from .layer import magnitude_and_direction, merge, reparameterize
from .model import GradNormLoRPModel, reparameterize_model


register_tuner("gradnormlorp", GradNormLoRPConfig, GradNormLoRPModel)

__all__ = [
    "GradNormLoRPConfig", "GradNormLoRPModel", "magnitude_and_direction", "merge", "reparameterize",
    "reparameterize_model",
]
