"""`TpSGDTrainer`: a `transformers.Trainer` that trains with tpSGD, DRTP or plain backprop."""
import json
import os
from typing import Optional

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .config import TpSGDConfig
from .model import TpSGDModel


logger = logging.get_logger(__name__)

CONFIG_FILE = "tpsgd_config.json"


class InputsLabelsDataset(torch.utils.data.Dataset):
    """Pairs of tensors served as the ``{"inputs", "labels"}`` batches TpSGDTrainer expects."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        if len(inputs) != len(labels):
            raise ValueError(f"`inputs` has {len(inputs)} rows but `labels` has {len(labels)}.")
        self.inputs, self.labels = inputs, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"inputs": self.inputs[i], "labels": self.labels[i]}


class TpSGDTrainer(Trainer):
    """Trainer for `nn.Sequential` classifiers with layer-local updates (tpSGD / DRTP) or backprop (`mode="bp"`).

    Everything else is the Trainer's: `TrainingArguments` (learning rate, schedule, gradient accumulation,
    clipping, logging, saving), datasets, collators, callbacks, `evaluate`/`predict` and checkpoint resume.
    Batches must hold the input under `TpSGDConfig.input_name` ("inputs") and class indices under "labels".
    The optimizer (`TpSGDConfig.optimizer`) has one parameter group per layer. Checkpoints hold the weights,
    the optimizer state and `tpsgd_config.json`; the P matrices come back from its seed.
    Each training log adds `peak_saved_activation_bytes` and the mean local loss of every hidden layer;
    `trainer.memory_report` has the full saved-tensor account.
    """

    def __init__(self, model: nn.Module = None, args=None, tpsgd_config: Optional[TpSGDConfig] = None, **kwargs):
        if isinstance(model, TpSGDModel):
            if tpsgd_config is not None and tpsgd_config != model.tpsgd_config:
                raise ValueError("Pass tpsgd_config either to TpSGDModel or to TpSGDTrainer, not two different ones.")
        elif isinstance(model, nn.Module):
            model = TpSGDModel(model, tpsgd_config)
        else:
            raise TypeError(
                f"TpSGDTrainer needs an nn.Sequential or a TpSGDModel as `model`, got {type(model).__name__}."
            )
        super().__init__(model=model, args=args, **kwargs)
        if self.tpsgd_config.mode != "bp" and self.args.world_size > 1:
            raise ValueError(
                f"TpSGDConfig.mode={self.tpsgd_config.mode!r} runs in one process (world_size is "
                f"{self.args.world_size}); layer-local updates call backward once per layer, which DDP does not sync."
            )
        self._local_loss_sums = None
        self._local_loss_count = 0

    @property
    def tpsgd_model(self) -> TpSGDModel:
        return self.accelerator.unwrap_model(self.model)

    @property
    def tpsgd_config(self) -> TpSGDConfig:
        return self.tpsgd_model.tpsgd_config

    @property
    def memory_report(self) -> dict:
        """Saved-activation account of the steps so far (bytes; peak overall and per layer)."""
        return self.tpsgd_model.memory.report()

    def create_optimizer(self, model=None):
        """One parameter group per layer, optimizer from `TpSGDConfig.optimizer`, hyper-parameters from args."""
        if self.optimizer is None:
            cfg, args = self.tpsgd_config, self.args
            groups = [
                {"params": params, "weight_decay": args.weight_decay}
                for params in self.tpsgd_model.layer_parameter_groups()
                if params
            ]
            if cfg.optimizer == "adam":
                self.optimizer = torch.optim.Adam(
                    groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
                )
            else:
                momentum = 0.0 if cfg.optimizer == "sgd" else cfg.momentum
                self.optimizer = torch.optim.SGD(
                    groups, lr=args.learning_rate, momentum=momentum, nesterov=cfg.optimizer == "nesterov"
                )
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        tpsgd_model = self.tpsgd_model
        if self.tpsgd_config.mode == "bp":
            with tpsgd_model.memory.track("bp"):
                return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        name = self.tpsgd_config.input_name
        if name not in inputs or "labels" not in inputs:
            raise KeyError(
                f"A tpSGD batch needs the keys '{name}' (TpSGDConfig.input_name) and 'labels'; got {sorted(inputs)}."
            )
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        loss, local_losses = tpsgd_model.local_step(inputs[name], inputs["labels"], scale=1.0 / accumulation)
        if self._local_loss_sums is None:
            self._local_loss_sums = [0.0] * len(local_losses)
        self._local_loss_sums = [s + v for s, v in zip(self._local_loss_sums, local_losses)]
        self._local_loss_count += 1
        return loss / accumulation

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs:  # a training log
            logs["peak_saved_activation_bytes"] = self.tpsgd_model.memory.peak_bytes
            if self._local_loss_count:
                for i, total in enumerate(self._local_loss_sums):
                    logs[f"local_loss_{i}"] = round(total / self._local_loss_count, 6)
                self._local_loss_sums, self._local_loss_count = None, 0
        super().log(logs, start_time)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            with open(os.path.join(output_dir, CONFIG_FILE), "w") as f:
                json.dump(self.tpsgd_config.to_dict(), f, indent=2)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, CONFIG_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                saved = {**TpSGDConfig().to_dict(), **json.load(f)}  # options newer than the checkpoint
            current = self.tpsgd_config.to_dict()
            keys = ("mode", "seed", "projection", "projection_scale", "recurrent_projection")
            changed = {k: (saved.get(k), current[k]) for k in keys if saved.get(k) != current[k]}
            if changed:
                raise ValueError(
                    f"Checkpoint {resume_from_checkpoint} was trained with a different TpSGDConfig "
                    f"({', '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in changed.items())}); the P matrices "
                    "would not match. Resume with the saved settings."
                )
        super()._load_from_checkpoint(resume_from_checkpoint, model)
