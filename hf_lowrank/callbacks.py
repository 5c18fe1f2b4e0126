"""Trainer callbacks for hf_lowrank optimizers."""
from transformers import TrainerCallback
from transformers.utils import logging

from .optim.layerwise import LayerwiseOptimizer
from .optim.optimizer import ProjectedOptimizer
from .utils.wrappers import find_optimizer


logger = logging.get_logger(__name__)


def find_layerwise_optimizer(optimizer):
    """The :class:`LayerwiseOptimizer` inside ``optimizer`` (through accelerate's wrapper), or None."""
    return find_optimizer(optimizer, lambda o: isinstance(o, LayerwiseOptimizer))


class LayerwiseGradNormCallback(TrainerCallback):
    """Makes ``Trainer`` logs right for layer-wise optimizers (``create_optimizer(..., layerwise=True)``).

    * Replaces the logged ``grad_norm`` (0.0, because the gradients are freed inside backward) by the true
      2-norm of the step's gradients recorded by the hooks, in the logs and in ``state.log_history``.
    * Refuses settings that cannot work layer-wise, before the first step:
      ``max_grad_norm > 0`` (global clipping needs every gradient before the first update; set
      ``max_grad_norm=0``) and ``fp16`` (the loss scaler unscales gradients in ``optimizer.step()``, after
      the hooks already used them; use ``bf16``).

    With a non-layer-wise optimizer it does nothing. Trainer calls callbacks in order and puts reporting
    integrations (TensorBoard, W&B) before user callbacks; for them to see the true value too, insert it first:
    ``trainer.callback_handler.callbacks.insert(0, LayerwiseGradNormCallback())``.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if find_layerwise_optimizer(optimizer) is None:
            return
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm} cannot be applied with layer-wise updates: "
                "each parameter is updated inside backward, before the global gradient norm is known (Trainer "
                "would silently clip nothing). Set max_grad_norm=0; the true grad_norm is still logged."
            )
        if args.fp16:
            raise ValueError(
                "fp16=True cannot be used with layer-wise updates: the loss scaler unscales gradients in "
                "optimizer.step(), after the hooks already applied them. Use bf16=True instead."
            )

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        layerwise = find_layerwise_optimizer(optimizer)
        if layerwise is None or logs is None or "grad_norm" not in logs:
            return
        grad_norm = layerwise.last_grad_norm
        logs["grad_norm"] = grad_norm
        if state.log_history and "grad_norm" in state.log_history[-1]:
            state.log_history[-1]["grad_norm"] = grad_norm


def attach_to_calling_trainer(layerwise, max_frames: int = 8) -> None:
    """Find the ``transformers.Trainer`` whose training loop calls ``layerwise.step()`` (a few frames up: Trainer
    never hands its arguments to the optimizer) and give it a :class:`LayerwiseGradNormCallback` if it has none, so
    ``max_grad_norm > 0`` and fp16 are refused and the true grad_norm is logged whether or not the user added
    the callback. Outside a Trainer it does nothing."""
    import sys

    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(max_frames):
        if frame is None:
            return
        trainer = frame.f_locals.get("self")
        if isinstance(trainer, Trainer):
            if not any(isinstance(c, LayerwiseGradNormCallback) for c in trainer.callback_handler.callbacks):
                callback = LayerwiseGradNormCallback()
                callback.on_train_begin(trainer.args, trainer.state, trainer.control, optimizer=layerwise)
                trainer.callback_handler.callbacks.insert(0, callback)
            return
        frame = frame.f_back


def find_projected_optimizer(optimizer):
    """The ProjectedOptimizer inside ``optimizer`` (through accelerate's / layer-wise wrappers), or None."""
    return find_optimizer(optimizer, lambda o: isinstance(o, ProjectedOptimizer))


class NonFiniteLogCallback(TrainerCallback):
    """Puts the optimizer's non-finite skip counts into the logs: ``skipped_steps`` (whole steps skipped, the
    default policy) and ``skipped_params`` (parameter updates skipped, layer-wise or ``nonfinite='skip_param'``),
    and warns when they grow. Reading the device counters synchronises once per log, never per step."""

    def __init__(self):
        self._seen = {}

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        projected = find_projected_optimizer(optimizer)
        if projected is None or logs is None:
            return
        report = projected.nonfinite_report()
        skipped_steps = report.get("skipped_steps", 0)
        skipped_params = report.get("skipped_params", {})
        entries = {"skipped_steps": skipped_steps}
        if skipped_params:
            entries["skipped_params"] = sum(skipped_params.values())
        logs.update(entries)
        if state.log_history:  # Trainer appended a copy of the logs before calling the callbacks
            state.log_history[-1].update(entries)
        if skipped_steps > self._seen.get("steps", 0):
            logger.warning(f"{skipped_steps - self._seen.get('steps', 0)} optimizer step(s) skipped for non-finite "
                           f"gradients since the last log (total {skipped_steps}).")
        for name, count in skipped_params.items():
            if count > self._seen.get(name, 0):
                logger.warning(f"Update of {name} skipped {count} time(s) so far for non-finite gradients.")
        self._seen = {"steps": skipped_steps, **skipped_params}


class RefreshLogCallback(TrainerCallback):
    """Puts the subspace refreshes into the logs: ``refreshes`` (SVDs done), ``refreshes_skipped`` (scheduled by
    ``update_proj_gap`` but skipped by the lazy policy, Q-GaLore's saving) and ``refresh_gap_mean``. Host numbers
    only (the per-layer figures: ``optimizer.refresh_report()``)."""

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        projected = find_projected_optimizer(optimizer)
        if projected is None or logs is None:
            return
        report = projected.refresh_report().values()
        if report:
            counts = {"refreshes": sum(r["refreshes"] for r in report),
                      "refreshes_skipped": sum(r["skipped"] for r in report),
                      "refresh_gap_mean": sum(r["gap"] for r in report) / len(report)}
            logs.update(counts)
            if state.log_history:  # Trainer appended its copy of the logs before calling the callbacks
                state.log_history[-1].update(counts)
