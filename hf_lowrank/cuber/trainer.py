"""``ContinualTrainer``: a ``transformers.Trainer`` that learns a sequence of tasks with finetune / GPM / CUBER.

Each task is one ordinary ``Trainer.train()`` run (``TrainingArguments``, callbacks, logging as usual) with a fresh
optimizer and scheduler. Around it the trainer (1) before the task, under TRGP/CUBER, tests every (layer, old task)
on the new task's gradient at the old model and assigns its regime (see ``projection``), (2) during the task
carries TRGP's learnable scales on the regime-2/3 old tasks (forward hooks; stored with the task and applied again
whenever it is evaluated) and, right before every optimizer step (a step hook, so any torch optimizer works),
runs CUBER's demotion test, adds the penalty's gradient and projects the gradients, (3) after the task folds the
layer inputs of a sample of the task's training data into the per-layer bases (only ``d x d`` covariances, never the
examples) and, for CUBER, stores the task's layer gradients, and (4) evaluates every task seen so far into the
accuracy matrix ``R``. Old tasks' evaluation sets are referenced for ``R`` only, never trained on.
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
    REGIME_STRONG,
    REGIME_WEAK,
    BackwardTransfer,
    GradientProjection,
    LayerProjection,
    ScaledWeightProjection,
    assign_regimes,
    correlation_test,
    trust_region,
)
from ..utils.targets import module_matches


logger = logging.get_logger(__name__)

STATE_FILE = "continual_state.pt"
WEIGHTS_FILE = "model.safetensors"


def _subset(dataset, indices: list[int]):
    """The examples ``indices`` of a map-style dataset (``datasets.Dataset.select`` when it has it)."""
    return dataset.select(indices) if hasattr(dataset, "select") else torch.utils.data.Subset(dataset, indices)


class _EpochCorrelationCheck(TrainerCallback):
    """``demotion="epoch"``: CUBER re-tests the correlation at the start of every epoch after the first (of every task
    that has old tasks to test against)."""

    def __init__(self, trainer: "ContinualTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if state.epoch and state.epoch > 0 and self.trainer._projection is not None:
            self.trainer._assign_regimes(retest=True)


class ContinualTrainer(Trainer):
    """Trainer for a sequence of tasks without replay.

    Args:
        continual_config: a :class:`ContinualConfig` (strategy, thresholds, target layers, heads).
        All other arguments are those of ``transformers.Trainer``; pass custom optimizers as
        ``optimizer_cls_and_kwargs`` (a fresh optimizer is built per task, since moments from an old task would
        move the protected subspaces).

    ``correlation_history`` holds one record per regime assignment (the start of each task after the first, and
    every re-test): per layer the tests and regime of each old task, the step demotions, and under CUBER
    ``subspaces``, per layer with regime-3 tasks the dimension of their span (``open``) and of what stays movable
    outside the other old tasks' subspaces (``allowed``).
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
            keep_task_bases=config.strategy in ("trgp", "cuber"),
            keep_task_grads=config.strategy == "cuber",
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
        self._trust_regions: dict[str, list[int]] = {}
        self._task_start_weights: dict[str, torch.Tensor] = {}
        if config.strategy == "cuber" and config.demotion == "epoch":
            self.add_callback(_EpochCorrelationCheck(self))

    # ------------------------------------------------------------------ public API
    @property
    def task_ids(self) -> list:
        return list(self.accuracy.task_ids)

    def train_task(self, task_id, train_dataset, eval_dataset=None) -> list[float]:
        """Train one task, update the memory, evaluate all tasks seen so far; returns the new row of ``R``."""
        self._check_task_id(task_id)
        if not hasattr(train_dataset, "__len__"):
            raise TypeError(f"`train_dataset` of task {task_id!r} must be map-style (have a length).")
        if len(train_dataset) == 0:
            raise ValueError(f"`train_dataset` of task {task_id!r} is empty.")
        if eval_dataset is not None and len(eval_dataset) == 0:
            raise ValueError(f"`eval_dataset` of task {task_id!r} is empty; pass None to skip its evaluation.")
        config = self.continual_config
        index = len(self.accuracy.task_ids)
        if config.head == "multi":
            self._check_head_count(index)
        seed = self.args.seed + index
        set_seed(seed)
        self._task_index = index
        train_dataset, gradient_dataset = self._split_gradient_holdout(train_dataset, seed=seed)
        self.train_dataset = train_dataset
        self.optimizer, self.lr_scheduler = None, None
        self._sample = self._sample_loader(train_dataset, seed=seed)
        self._projection = None
        scale_handles = []
        if config.strategy != "finetune" and index > 0:
            self._projection = GradientProjection(
                self.target_layers, {}, frozen=self._frozen_parameters(), project_update=config.project_update,
                demote_every_step=config.strategy == "cuber" and config.demotion == "step",
                backward_scale=config.backward_scale,
            )
            self._assign_regimes(retest=False)
            if self._scaled is not None:
                scale_handles = self._scaled.attach(self.target_layers)
        try:
            self.train()
            if self._projection is not None and self._projection.demotions:
                self.correlation_history[-1]["demotions"] = [
                    {"step": step, "layer": name, "old_task": j} for step, name, j in self._projection.demotions]
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
            self._hook_handles, self._scaled, self._task_start_weights = [], None, {}
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
        """Bytes held per layer: union basis, per-task bases and TRGP scales (TRGP, CUBER), stored layer gradients
        (CUBER)."""
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
            self._hook_handles.append(self._scaled.attach_optimizer(optimizer, scale_lr))
        return optimizer

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        if self.continual_config.head == "multi":
            inputs[self.continual_config.task_kwarg] = self._task_index
        return inputs

    # ------------------------------------------------------------------ internals
    def _check_task_id(self, task_id) -> None:
        """Task ids key the accuracy matrix, the logs (``continual/acc_<id>``) and the JSON: they must be hashable,
        not None, new, and distinct from every earlier id also once converted to text."""
        if task_id is None:
            raise ValueError("Task id None is not allowed: give every task an id (an int or a string).")
        try:
            hash(task_id)
        except TypeError:
            raise TypeError(f"Task id {task_id!r} ({type(task_id).__name__}) is not hashable; use an int or a string."
                            ) from None
        if task_id in self.accuracy.task_ids:
            raise ValueError(f"Task id {task_id!r} was already trained; every task needs a new id.")
        clash = [t for t in self.accuracy.task_ids if str(t) == str(task_id)]
        if clash:
            raise ValueError(f"Task id {task_id!r} collides with the earlier id {clash[0]!r} once written as text (logs "
                             "and JSON keys); rename one of them.")

    def _check_head_count(self, index: int) -> None:
        """Multi-head: task ``index`` is passed as the head index, so the model needs more than ``index`` heads."""
        patterns = self.continual_config.head_modules
        matched = [(n, m) for n, m in self.model.named_modules() if n and module_matches(n, patterns)]
        top = [(n, m) for n, m in matched if not any(n.startswith(other + ".") for other, _ in matched)]
        if len(top) == 1 and isinstance(top[0][1], (torch.nn.ModuleList, torch.nn.ModuleDict)):
            count = len(top[0][1])
        else:
            count = len(top)
        if index >= count:
            raise ValueError(
                f"Task {index} (0-based) needs head {index}, but `head_modules`={patterns!r} matches {count} head(s) "
                f"in {type(self.model).__name__}; build the model with at least {index + 1} heads.")

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

    def _assign_regimes(self, retest: bool) -> None:
        """Test every (layer, old task) at the current weights and build the task's projections (and, at the start
        of a task, its TRGP scales and regime-3 bookkeeping).

        At the start (``retest=False``) the trust region of each layer is fixed: the ``trust_region_size`` old tasks
        with the largest projection among those passing Definition 1. A re-test (``demotion="epoch"``) only moves
        trust-region tasks between regimes 2 and 3."""
        config = self.continual_config
        names = list(self.target_layers)
        record = {"task_index": self._task_index, "layers": {}}
        open_tasks = {name: [] for name in names}
        if config.strategy in ("trgp", "cuber"):
            _, grads = self._sample_statistics(record=False)
            for name in names:
                layer = self.memory.layers[name]
                old_grads = layer.task_grads if config.strategy == "cuber" else [None] * len(layer.task_bases)
                tests = [
                    correlation_test(grads[name], basis, old, config.epsilon_1, config.epsilon_2,
                                     on=config.correlation_test)
                    for basis, old in zip(layer.task_bases, old_grads)
                ]
                if not retest:
                    self._trust_regions[name] = trust_region(tests, config.trust_region_size)
                regimes = assign_regimes(tests, self._trust_regions[name],
                                         may_open=config.strategy == "cuber" and name in self.backward_layers)
                open_tasks[name] = [j for j, regime in enumerate(regimes) if regime == REGIME_POSITIVE]
                rows = []
                for j, (t, regime) in enumerate(zip(tests, regimes)):
                    row = {"old_task": j, "ratio": t.projection_ratio, "sufficient": t.regime != REGIME_WEAK,
                           "regime": regime}
                    if config.strategy == "cuber":
                        row.update(cosine=t.cosine, correlated=t.regime == REGIME_POSITIVE)
                    rows.append(row)
                record["layers"][name] = rows
            logger.info(f"{config.strategy} task {self._task_index}: regime-3 old tasks per layer {open_tasks}")
        else:
            record["layers"] = {name: [{"old_task": j, "regime": REGIME_WEAK} for j in range(self.memory.num_tasks)]
                                for name in names}
        self.correlation_history.append(record)
        if not retest and config.uses_scales:
            self._scaled = ScaledWeightProjection.identity(self.memory.layers, self._trust_regions, self.args.device,
                                                           preconditioned=config.scale_update == "preconditioned")
        backward = None
        if config.strategy == "cuber":
            if not retest:  # W^{t-1}, what the penalty measures the change from
                self._task_start_weights = {n: self.target_layers[n].weight.detach().clone() for n in names}
            backward = BackwardTransfer(self.memory.layers, open_tasks, self._task_start_weights, config.penalty_lambda,
                                        config.epsilon_2, config.correlation_test)
        self._projection.backward = backward
        self._projection.projections = {
            name: LayerProjection(self.memory.layers[name], open_tasks[name], config.backward_scale) for name in names
        }
        if config.strategy == "cuber":
            record["subspaces"] = {name: {"open": p.open_dims, "allowed": p.allowed_dims}
                                   for name, p in self._projection.projections.items() if p.open_tasks}

    def regime_counts(self) -> list[dict[str, dict[int, int]]]:
        """Per task after the first: ``{layer: {regime: number of old tasks}}`` as assigned at the start of the task,
        with the step demotions (regime 3 → 2) applied."""
        counts = []
        for record in self.correlation_history:
            demoted = {(d["layer"], d["old_task"]) for d in record.get("demotions", [])}
            per_layer = {}
            for name, rows in record["layers"].items():
                tally = {REGIME_WEAK: 0, REGIME_STRONG: 0, REGIME_POSITIVE: 0}
                for row in rows:
                    regime = REGIME_STRONG if (name, row["old_task"]) in demoted else row["regime"]
                    tally[regime] += 1
                per_layer[name] = tally
            counts.append(per_layer)
        return counts

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

