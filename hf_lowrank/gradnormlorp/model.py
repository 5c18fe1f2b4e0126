"""GradNormLoRP: train magnitude and direction of targeted weights, with low-rank projected direction gradients.

Huang et al. (arXiv:2412.19616) write ``W = m ⊙ V/‖V‖`` (row norms) and run GaLore on the gradient of ``V``.
Their released optimizer keeps full-size AdamW moments for ``V`` and so saves no memory; here ``V`` sits in a
``ProjectedOptimizer`` group with ``rank``, so its moments really are ``rank``-sized.
"""
import torch
import torch.nn as nn

from ..tuners import TunerModel, modules_to_save_names, set_trainable
from ..utils.targets import find_target_linears
from .config import GradNormLoRPConfig
from .layer import DIRECTION, MAGNITUDE, is_reparameterized, merge, reparameterize


class GradNormLoRPModel(TunerModel):
    """A transformers model whose targeted linears are reparameterised in place; only ``m``, ``V`` (and
    ``modules_to_save``) are trainable. Build its optimizer with :meth:`create_optimizer`."""

    method = "gradnormlorp"

    def __init__(self, model: nn.Module, config: GradNormLoRPConfig):
        if not isinstance(config, GradNormLoRPConfig):
            raise TypeError(f"`config` must be a GradNormLoRPConfig, got {type(config).__name__}.")
        super().__init__(model, config)
        self.targets: list[str] = []

    def _apply_layout(self, layout: dict) -> None:
        for name in layout["targets"]:
            reparameterize(self.model.get_submodule(name))
        self.targets = list(layout["targets"])
        trainable = {f"{n}.{suffix}" for n in self.targets for suffix in (MAGNITUDE, DIRECTION)}
        set_trainable(self.model, trainable | modules_to_save_names(self.model, self.tuner_config.modules_to_save))

    def reparameterize(self) -> "GradNormLoRPModel":
        found = find_target_linears(self.model, self.tuner_config.target_modules, module_types=(nn.Linear,))
        names = [n for n, m in found if not is_reparameterized(m)]
        if not names:
            raise ValueError("`target_modules` matched only already reparameterised layers.")
        self._apply_layout({"targets": names})
        return self

    def layout(self) -> dict:
        return {"targets": self.targets}

    def tuner_state_dict(self) -> dict[str, torch.Tensor]:
        names = {f"{n}.{suffix}" for n in self.targets for suffix in (MAGNITUDE, DIRECTION)}
        names |= modules_to_save_names(self.model, self.tuner_config.modules_to_save)
        return {n: p for n, p in self.model.named_parameters() if n in names}

    def projected_parameter_names(self) -> list[str]:
        return [f"{n}.{DIRECTION}" for n in self.targets]

    def optimizer_cls_and_kwargs(self, lr: float = 1e-3, **kwargs):
        """Like :meth:`TunerModel.optimizer_cls_and_kwargs`, with the config's rank/gap/scale/proj_type/projector."""
        keys = ("rank", "update_proj_gap", "scale", "proj_type", "projector")
        defaults = {key: getattr(self.tuner_config, key) for key in keys}
        return super().optimizer_cls_and_kwargs(lr, **{**defaults, **kwargs})

    def merge_and_unload(self) -> nn.Module:
        """Write every ``m ⊙ V/‖V‖`` into a dense weight and return the plain transformers model."""
        for name in self.targets:
            merge(self.model.get_submodule(name))
        self.targets = []
        self.restore_requires_grad()
        return self.model

    def card_details(self) -> list[str]:
        c = self.tuner_config
        return [
            f"- GradNormLoRP on {len(self.targets)} linear layers: W = m ⊙ V/‖V‖, direction gradients "
            f"projected to rank {c.rank} ({c.projector}, refresh every {c.update_proj_gap} steps, scale {c.scale})",
        ]


def reparameterize_model(model: nn.Module, config: GradNormLoRPConfig) -> GradNormLoRPModel:
    """Reparameterise `model`'s targeted linears in place and return the :class:`GradNormLoRPModel` wrapping it."""
    return GradNormLoRPModel(model, config).reparameterize()
