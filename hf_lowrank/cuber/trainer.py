"""``ContinualTrainer``: a ``transformers.Trainer`` that learns a sequence of tasks with finetune / GPM / CUBER.

Each task is one ordinary ``Trainer.train()`` run (``TrainingArguments``, callbacks, logging as usual) with a fresh
optimizer and scheduler. Around it the trainer (1) before the task, under CUBER, runs the layer-wise correlation
test and builds each layer's projection, (2) projects gradients right before every optimizer step (a step hook,
so any torch optimizer works), (3) after the task folds the layer inputs of a sample of the task's training data
into the per-layer bases (only ``d x d`` covariances, never the examples) and (4) evaluates every task seen so far
into the accuracy matrix ``R``. Old tasks' evaluation sets are referenced for ``R`` only, never trained on.
With ``forward_transfer=True`` (CUBER) the layers also carry TRGP's learnable scales on the trust-region old
tasks' frozen weights during the task; they are stored with the task and applied again whenever it is evaluated.
"""
import inspect
import os
from contextlib import nullcontext

import torch
from safetensors.torch import load_model, save_model
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import set_seed
from transformers.utils import logging

from .config import ContinualConfig
from .memory import RepresentationRecorder, SubspaceMemory, find_projectable_layers, weight_matrix
from .metrics import AccuracyMatrix
from .projection import (
    REGIME_POSITIVE,
    REGIME_WEAK,
    GradientProjection,
    LayerProjection,
    ScaledWeightProjection,
    correlation_test,
)
from ..utils.targets import module_matches


logger = logging.get_logger(__name__)

STATE_FILE = "continual_state.pt"
WEIGHTS_FILE = "model.safetensors"


def _subset(dataset, indices: list[int]):
    """The examples ``indices`` of a map-style dataset (``datasets.Dataset.select`` when it has it)."""
    return dataset.select(indices) if hasattr(dataset, "select") else torch.utils.data.Subset(dataset, indices)


class _EpochCorrelationCheck(TrainerCallback):
    """CUBER re-tests the correlation at the start of every epoch after the first."""

    def __init__(self, trainer: "ContinualTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if state.epoch and state.epoch > 0:
            self.trainer._refresh_projection()


class ContinualTrainer(Trainer):
    """Trainer for a sequence of tasks without replay.

    Args:
        continual_config: a :class:`ContinualConfig` (strategy, thresholds, target layers, heads).
        All other arguments are those of ``transformers.Trainer``; pass custom optimizers as
        ``optimizer_cls_and_kwargs`` (a fresh optimizer is built per task, since moments from an old task would
        move the protected subspaces).
    """

    def __init__(self, model=None, args=None, continual_config: ContinualConfig | None = None, **kwargs):
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ValueError(
                "ContinualTrainer builds a fresh optimizer per task; pass `optimizer_cls_and_kwargs=(cls, kwargs)` "
                "instead of `optimizers=`."
            )
        if kwargs.get("model_init") is not None:
            raise ValueError("ContinualTrainer keeps one model across tasks; `model_init` is not supported.")
        super().__init__(model=model, args=args, **kwargs)
        self.continual_config = config = continual_config or ContinualConfig()
        if config.strategy != "finetune" and self.args.world_size > 1:
            raise ValueError(
                f"ContinualConfig.strategy={config.strategy!r} runs in one process (world_size is "
                f"{self.args.world_size}): the subspace bases and the stored task gradients would be built from each "
                "rank's own share of the data, with no all-reduce, so the ranks would protect different subspaces. "
                "Run it with a single process, or use strategy='finetune' for multi-process training."
            )
        multi = config.head == "multi"
        if multi:
            self._check_task_kwarg()
        self.target_layers = dict(
            find_projectable_layers(self.model, config.target_modules, config.head_modules if multi else None)
        )
        self.memory = SubspaceMemory(
            {name: weight_matrix(m.weight).shape[1] for name, m in self.target_layers.items()},
            keep_task_statistics=config.strategy == "cuber",
        )
        self.backward_layers = self._backward_transfer_layers()
        self.accuracy = AccuracyMatrix()
        self.correlation_history: list[dict] = []
        self._eval_sets: dict = {}
        self._task_index = 0
        self._projection: GradientProjection | None = None
        self._sample = None
        self._hook_handles = []
        self._scaled: ScaledWeightProjection | None = None
        self._positives: dict[str, list[int]] = {}
        if config.strategy == "cuber" and config.recheck_every_epoch:
            self.add_callback(_EpochCorrelationCheck(self))

    # ------------------------------------------------------------------ public API
    @property
    def task_ids(self) -> list:
        return list(self.accuracy.task_ids)

    def train_task(self, task_id, train_dataset, eval_dataset=None) -> list[float]:
        """Train one task, update the memory, evaluate all tasks seen so far; returns the new row of ``R``."""
        if task_id in self.accuracy.task_ids:
            raise ValueError(f"Task id {task_id!r} was already trained; every task needs a new id.")
        if not hasattr(train_dataset, "__len__"):
            raise TypeError(f"`train_dataset` of task {task_id!r} must be map-style (have a length).")
        if len(train_dataset) == 0:
            raise ValueError(f"`train_dataset` of task {task_id!r} is empty.")
        if eval_dataset is not None and len(eval_dataset) == 0:
            raise ValueError(f"`eval_dataset` of task {task_id!r} is empty; pass None to skip its evaluation.")
        config = self.continual_config
        index = len(self.accuracy.task_ids)
        seed = self.args.seed + index
        set_seed(seed)
        self._task_index = index
        train_dataset, gradient_dataset = self._split_gradient_holdout(train_dataset, seed=seed)
        self.train_dataset = train_dataset
        self.optimizer, self.lr_scheduler = None, None
        self._sample = self._sample_loader(train_dataset, seed=seed)
        self._projection = None
        if config.strategy != "finetune" and index > 0:
            self._projection = GradientProjection(
                self.target_layers, {}, frozen=self._frozen_parameters(), project_update=config.project_update
            )
            self._refresh_projection()
        scale_handles = []
        if config.forward_transfer and index > 0:
            self._scaled = ScaledWeightProjection.identity(self.memory.layers, self._trust_regions(), self.args.device)
            scale_handles = self._scaled.attach(self.target_layers)
            self._build_layer_projections()
        try:
            self.train()
            if config.strategy != "finetune":
                covariances, grads = self._sample_statistics(
                    record=True, need_grads=config.strategy == "cuber" and gradient_dataset is None)
                if gradient_dataset is not None:
                    _, grads = self._sample_statistics(
                        record=False, loader=self._sample_loader(gradient_dataset, seed=seed))
                names = list(self.target_layers)
                thresholds = {n: config.threshold_for(i, n, len(names), index) for i, n in enumerate(names)}
                scales = self._scaled.stored() if self._scaled is not None else None
                self.memory.add_task(covariances, thresholds, grads, scales)
        finally:
            for handle in self._hook_handles + scale_handles:
                handle.remove()
            self._hook_handles, self._scaled = [], None
        self._sample = None
        self._eval_sets[task_id] = eval_dataset
        row = [self._task_accuracy(j, t) for j, t in enumerate(self.accuracy.task_ids + [task_id])]
        self.accuracy.add_row(task_id, row)
        self._task_index = index
        self._log_task_end(task_id, row)
        if config.save_state and self.args.output_dir and self.is_world_process_zero():
            self.save_continual_checkpoint(os.path.join(self.args.output_dir, f"task-{index}"))
        return row

    def train_tasks(self, tasks) -> AccuracyMatrix:
        """Train a sequence: a list of ``(task_id, train, eval)`` tuples or of ``(train, eval)`` pairs / datasets
        (ids ``0..T-1``). Tasks already trained (after :meth:`load_continual_checkpoint`) only register their
        evaluation set, so resuming a sequence is ``load_continual_checkpoint(dir); train_tasks(same list)``."""
        for position, task in enumerate(tasks):
            if isinstance(task, tuple) and len(task) == 3:
                task_id, train, evaluation = task
            elif isinstance(task, tuple) and len(task) == 2:
                (train, evaluation), task_id = task, position
            else:
                train, evaluation, task_id = task, None, position
            if task_id in self.accuracy.task_ids:
                self._eval_sets[task_id] = evaluation
                continue
            self.train_task(task_id, train, evaluation)
        return self.accuracy

    def memory_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes held per layer: union basis, per-task bases and stored gradient projections (CUBER)."""
        return self.memory.nbytes()

    def save_continual_checkpoint(self, directory: str) -> None:
        """Model weights (safetensors) and the continual state (tensors, numbers, ids; ``weights_only`` loadable)."""
        os.makedirs(directory, exist_ok=True)
        save_model(self.model, os.path.join(directory, WEIGHTS_FILE))
        state = {
            "memory": self.memory.state_dict(),
            "task_ids": list(self.accuracy.task_ids),
            "accuracy_rows": [torch.tensor(row, dtype=torch.float64) for row in self.accuracy.rows],
            "strategy": self.continual_config.strategy,
        }
        torch.save(state, os.path.join(directory, STATE_FILE))
        self.accuracy.save_json(os.path.join(directory, "accuracy_matrix.json"))

    def load_continual_checkpoint(self, directory: str) -> None:
        """Restore weights, bases and task state saved by :meth:`save_continual_checkpoint`."""
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
        if state["strategy"] != self.continual_config.strategy:
            raise ValueError(
                f"Checkpoint was written with strategy {state['strategy']!r}, this trainer uses "
                f"{self.continual_config.strategy!r}."
            )
        load_model(self.model, os.path.join(directory, WEIGHTS_FILE))
        self.memory.load_state_dict(state["memory"])
        self.accuracy = AccuracyMatrix(state["task_ids"], [row.tolist() for row in state["accuracy_rows"]])
        self._eval_sets = {task_id: self._eval_sets.get(task_id) for task_id in self.accuracy.task_ids}

    # ------------------------------------------------------------------ Trainer hooks
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self._projection is not None and not self._hook_handles:
            self._hook_handles = self._projection.attach(optimizer)
        if self._scaled is not None and self._scaled.parameters():
            scale_lr = self.continual_config.scale_learning_rate or self.args.learning_rate
            optimizer.add_param_group({"params": self._scaled.parameters(), "weight_decay": 0.0, "lr": scale_lr})
        return optimizer

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        if self.continual_config.head == "multi":
            inputs[self.continual_config.task_kwarg] = self._task_index
        return inputs

    # ------------------------------------------------------------------ internals
    def _check_task_kwarg(self) -> None:
        parameters = inspect.signature(self.model.forward).parameters
        name = self.continual_config.task_kwarg
        if name not in parameters and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            raise ValueError(
                f"`head='multi'` passes the task index as `{name}=` to the model, but "
                f"{type(self.model).__name__}.forward does not accept it; add that argument or set `task_kwarg`."
            )

    def _backward_transfer_layers(self) -> set:
        """Target layers where CUBER may keep updates inside positively correlated old subspaces."""
        selected = self.continual_config.backward_transfer_modules
        if selected is None:
            return set(self.target_layers)
        layers = {name for name in self.target_layers if module_matches(name, selected)}
        if not layers:
            raise ValueError(
                f"`backward_transfer_modules`={selected!r} matched none of the target layers {list(self.target_layers)}."
            )
        return layers

    def _frozen_parameters(self) -> list:
        config = self.continual_config
        if not config.freeze_unprojected_after_first_task:
            return []
        projected = {id(m.weight) for m in self.target_layers.values()}
        heads = config.head_modules if config.head == "multi" else None
        frozen = []
        for module_name, module in self.model.named_modules():
            if heads and module_matches(module_name, heads):
                continue
            for param in module.parameters(recurse=False):
                if param.requires_grad and id(param) not in projected:
                    frozen.append(param)
        if heads:  # parameters of a head's submodules were visited through the submodule itself
            head_params = {id(p) for n, m in self.model.named_modules() if module_matches(n, heads) for p in m.parameters()}
            frozen = [p for p in frozen if id(p) not in head_params]
        return frozen

    def _sample_loader(self, dataset, seed: int):
        """Data loader over at most ``representation_samples`` training examples (seeded choice)."""
        count = min(self.continual_config.representation_samples, len(dataset))
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
        return self.get_eval_dataloader(_subset(dataset, indices))

    def _split_gradient_holdout(self, dataset, seed: int):
        """``(examples to train on, examples for the stored gradient or None)`` per ``gradient_holdout``."""
        fraction = self.continual_config.gradient_holdout
        count = int(round(fraction * len(dataset)))
        if count == 0:
            return dataset, None
        if count == len(dataset):
            raise ValueError(f"`gradient_holdout`={fraction} leaves no training example in a task of {len(dataset)}.")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
        return _subset(dataset, sorted(order[count:])), _subset(dataset, sorted(order[:count]))

    def _sample_statistics(self, record: bool, need_grads: bool = True, loader=None):
        """One pass over ``loader`` (default: the task's sample) at the current weights: input covariances of the
        target layers (if ``record``) and the mean-loss gradient of their weights (if ``need_grads``). Leaves
        ``.grad`` untouched."""
        loader = loader or self._sample
        model = self.model
        was_training = model.training
        model.eval()
        weights = [m.weight for m in self.target_layers.values()]
        grads = [torch.zeros_like(w) for w in weights] if need_grads else None
        total = len(loader.dataset)
        recorder = RepresentationRecorder(list(self.target_layers.items()))
        with torch.enable_grad() if need_grads else torch.no_grad():
            with recorder if record else nullcontext():
                for batch in loader:
                    inputs = self._prepare_inputs(batch)
                    if not need_grads:
                        model(**inputs)
                        continue
                    size = len(next(iter(batch.values())))
                    loss = self.compute_loss(model, inputs) * (size / total)
                    for acc, g in zip(grads, torch.autograd.grad(loss, weights, allow_unused=True)):
                        if g is not None:
                            acc += g
        model.train(was_training)
        named_grads = dict(zip(self.target_layers, grads)) if need_grads else None
        return recorder.covariances, named_grads

    def _refresh_projection(self) -> None:
        """(Re)build every layer's projection; under CUBER run the correlation test at the current weights."""
        if self._projection is None:
            return
        config = self.continual_config
        positives = {name: [] for name in self.target_layers}
        if config.strategy == "cuber":
            _, grads = self._sample_statistics(record=False)
            record = {"task_index": self._task_index, "layers": {}}
            for name, layer in self.memory.layers.items():
                tests = [
                    correlation_test(grads[name], basis, old_grad, config.epsilon_1, config.epsilon_2)
                    for basis, old_grad in zip(layer.task_bases, layer.task_grads)
                ]
                if name in self.backward_layers:
                    positives[name] = [j for j, t in enumerate(tests) if t.regime == REGIME_POSITIVE]
                record["layers"][name] = [
                    {"old_task": j, "ratio": t.projection_ratio, "cosine": t.cosine, "regime": t.regime}
                    for j, t in enumerate(tests)
                ]
            self.correlation_history.append(record)
            logger.info(f"CUBER task {self._task_index}: positively correlated old tasks per layer {positives}")
        self._positives = positives
        self._build_layer_projections()

    def _build_layer_projections(self) -> None:
        """Layer projections from the latest test. Old tasks reused through TRGP scales keep ``W B_j`` frozen (as in
        TRGP): moving it as well would be amplified by the scale, which diverged in our digits runs."""
        config = self.continual_config
        scaled = self._scaled.scales if self._scaled is not None else {}
        self._projection.projections = {
            name: LayerProjection(
                self.memory.layers[name],
                [j for j in self._positives[name] if j not in scaled.get(name, {})],
                config.backward_scale,
                config.step_guard,
            )
            for name in self.target_layers
        }

    def _trust_regions(self) -> dict[str, list[int]]:
        """Per layer, the ``trust_region_size`` strongly related old tasks with the largest projection ratio."""
        latest = self.correlation_history[-1]["layers"]
        regions = {}
        for name, tests in latest.items():
            strong = sorted((t for t in tests if t["regime"] != REGIME_WEAK), key=lambda t: -t["ratio"])
            regions[name] = [t["old_task"] for t in strong[: self.continual_config.trust_region_size]]
        return regions

    def _task_accuracy(self, task_index: int, task_id) -> float:
        dataset = self._eval_sets.get(task_id)
        if dataset is None:
            return float("nan")
        self._task_index = task_index
        stored = ScaledWeightProjection.from_memory(self.memory.layers, task_index)
        handles = stored.attach(self.target_layers)
        try:
            output = self.predict(dataset, metric_key_prefix="continual")
        finally:
            for handle in handles:
                handle.remove()
        if "continual_accuracy" in output.metrics:
            return float(output.metrics["continual_accuracy"])
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        return float((logits.argmax(-1) == output.label_ids).mean())

    def _log_task_end(self, task_id, row) -> None:
        logs = {f"continual/acc_{t}": a for t, a in zip(self.accuracy.task_ids, row)}
        logs["continual/ACC"] = self.accuracy.acc()
        if len(row) > 1:
            logs["continual/BWT"] = self.accuracy.bwt()
        logs["continual/memory_bytes"] = self.memory.total_bytes()
        self.log(logs)
        logger.info(f"Finished task {task_id!r}: R row {row}; basis sizes {self.memory.ranks()}")

