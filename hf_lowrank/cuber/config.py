"""Configuration of continual training: which strategy, which layers, and the GPM/CUBER thresholds."""
from dataclasses import dataclass, field
from typing import Optional, Union


STRATEGIES = ("finetune", "gpm", "cuber")
HEADS = ("shared", "multi")


def _check_unit_interval(name: str, value: float, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")


@dataclass
class ContinualConfig:
    """How a :class:`~hf_lowrank.cuber.ContinualTrainer` protects (and revisits) old tasks.

    Defaults are GPM/TRGP's PMNIST values (Saha et al. 2021; Lin et al. 2022): energy thresholds
    ``[0.95, 0.99, 0.99]`` for a 3-layer MLP, ``epsilon_1 = 0.2``.
    """

    strategy: str = field(
        default="cuber",
        metadata={"help": "'finetune' (no protection), 'gpm' (project out old input subspaces) or 'cuber' "
                  "(GPM, but keep updates inside positively correlated old subspaces: backward transfer)."},
    )
    target_modules: Union[str, list[str]] = field(
        default="all-linear",
        metadata={"help": "Layers whose input subspaces are remembered: 'all-linear', a full-match regex or a list "
                  "of names/substrings (transformers' `optim_target_modules` semantics). nn.Linear and "
                  "nn.Conv2d (groups=1, zero padding) are supported; anything else matched raises an error."},
    )
    energy_threshold: Union[float, list[float], dict[str, float]] = field(
        default=0.97,
        metadata={"help": "GPM's epsilon_th in (0, 1]: fraction of a layer's input energy the kept basis must "
                  "explain. One number, one per target layer (in model order), or {layer name: value}."},
    )
    energy_threshold_increment: float = field(
        default=0.0,
        metadata={"help": "Added to every threshold per finished task (GPM uses 0.003 on CIFAR-100); capped at 1."},
    )
    epsilon_1: float = field(
        default=0.2,
        metadata={"help": "Sufficient projection: old task j is 'strongly' related at a layer when "
                  "||g B_j B_j^T|| >= epsilon_1 ||g|| for the new task's gradient g. In (0, 1]."},
    )
    epsilon_2: float = field(
        default=0.0,
        metadata={"help": "Positive correlation: cos(g B_j, g_j B_j) > epsilon_2, with g_j old task j's stored "
                  "gradient. In [0, 1]; 0 means any positive inner product."},
    )
    backward_transfer_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "CUBER: names/substrings of the target layers where backward transfer may happen (None: "
                  "all). Leave out a shared output head: every old task's head subspace is (nearly) the whole "
                  "feature space, so the projection test cannot tell tasks apart there, and moving the head "
                  "rewrites every old task's decisions at once (on the mixed-distortion digits sequence, backward "
                  "transfer at the head alone gave BWT -8.0 vs GPM's -4.7). Excluded layers are GPM-projected."},
    )
    backward_scale: float = field(
        default=1.0,
        metadata={"help": "Multiplier of the kept gradient component inside positively correlated old subspaces."},
    )
    step_guard: bool = field(
        default=False,
        metadata={"help": "CUBER: also test every step, dropping the in-subspace component of a step whose "
                  "first-order effect on a positively correlated old task would be harmful (<g_S, g_j> < 0)."},
    )
    recheck_every_epoch: bool = field(
        default=True,
        metadata={"help": "CUBER: repeat the layer-wise correlation test at the start of every epoch."},
    )
    forward_transfer: bool = field(
        default=False,
        metadata={"help": "CUBER: also apply TRGP's scaled weight projection (a learnable r_j x r_j scale on the "
                  "frozen part W B_j of the trust-region old tasks, stored with the new task)."},
    )
    trust_region_size: int = field(
        default=2,
        metadata={"help": "Forward transfer: at most this many strongly related old tasks per layer (TRGP: 2)."},
    )
    scale_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Forward transfer: learning rate of the TRGP scales (None: the model's). The scales multiply "
                  "W B_j, so a large model lr can make them diverge (measured: lr 0.1 on the digits MLP)."},
    )
    head: str = field(
        default="shared",
        metadata={"help": "'shared' (one output layer for all tasks, projected like any layer) or 'multi' "
                  "(task-incremental: the model takes the task index as `task_kwarg` and picks its own head)."},
    )
    head_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "multi-head only: names/substrings of the task-specific head modules. They are never "
                  "projected nor frozen."},
    )
    task_kwarg: str = field(
        default="task_id",
        metadata={"help": "multi-head only: keyword argument through which the model receives the task index."},
    )
    freeze_unprojected_after_first_task: bool = field(
        default=True,
        metadata={"help": "gpm/cuber: after the first task, parameters outside the target layers and heads "
                  "(biases, norms, embeddings) get no update, as in GPM; otherwise old outputs drift."},
    )
    project_update: bool = field(
        default=False,
        metadata={"help": "Also project the optimizer's update after the step. Needed for Adam-type optimizers "
                  "and weight decay, whose elementwise scaling leaves the projected subspace."},
    )
    gradient_holdout: float = field(
        default=0.0,
        metadata={"help": "CUBER: fraction of each task's training examples kept out of its training and used only "
                  "for the stored gradient g_j at the end of the task. A task trained to convergence has a near-"
                  "zero, noisy gradient on its own training examples; on unseen examples g_j points where its "
                  "generalisation loss falls, which is what the correlation test needs. In [0, 0.5]; 0 = off."},
    )
    representation_samples: int = field(
        default=300,
        metadata={"help": "Training examples per task used for the representation matrix, the stored old-task "
                  "gradient and the correlation test (GPM/TRGP use 300 on MLPs). Never kept afterwards."},
    )
    save_state: bool = field(
        default=True,
        metadata={"help": "Write `continual_state.pt` and the model to `args.output_dir`/task-<i> after each task."},
    )

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy`={self.strategy!r} is not supported; use one of {list(STRATEGIES)}.")
        if self.head not in HEADS:
            raise ValueError(f"`head`={self.head!r} is not supported; use 'shared' or 'multi'.")
        if self.head == "multi" and not self.head_modules:
            raise ValueError("`head='multi'` needs `head_modules`: the names of the task-specific output modules.")
        if self.head == "shared" and self.head_modules:
            raise ValueError("`head_modules` is only meaningful with `head='multi'`.")
        thresholds = self.energy_threshold
        values = thresholds.values() if isinstance(thresholds, dict) else (
            thresholds if isinstance(thresholds, (list, tuple)) else [thresholds])
        if len(values) == 0:
            raise ValueError("`energy_threshold` is empty: give one number in (0, 1] or one per layer.")
        for value in values:
            _check_unit_interval("energy_threshold", value)
        if not isinstance(self.energy_threshold_increment, (int, float)) or not 0 <= self.energy_threshold_increment < 1:
            raise ValueError(f"`energy_threshold_increment` must be in [0, 1), got {self.energy_threshold_increment!r}.")
        _check_unit_interval("epsilon_1", self.epsilon_1)
        _check_unit_interval("epsilon_2", self.epsilon_2, allow_zero=True)
        if not isinstance(self.backward_scale, (int, float)) or self.backward_scale < 0:
            raise ValueError(f"`backward_scale` must be a non-negative number, got {self.backward_scale!r}.")
        if not isinstance(self.gradient_holdout, (int, float)) or not 0.0 <= self.gradient_holdout <= 0.5:
            raise ValueError(f"`gradient_holdout` must be in [0, 0.5] (a fraction of each task's training set), "
                             f"got {self.gradient_holdout!r}.")
        if self.gradient_holdout and self.strategy != "cuber":
            raise ValueError("`gradient_holdout` needs `strategy='cuber'` (only CUBER stores old-task gradients).")
        if self.backward_transfer_modules is not None:
            if self.strategy != "cuber":
                raise ValueError("`backward_transfer_modules` needs `strategy='cuber'`.")
            if isinstance(self.backward_transfer_modules, str) or not all(
                    isinstance(m, str) for m in self.backward_transfer_modules):
                raise TypeError("`backward_transfer_modules` must be a list of layer names/substrings (or None for all).")
        if self.forward_transfer and self.strategy != "cuber":
            raise ValueError("`forward_transfer=True` needs `strategy='cuber'` (it uses the per-task bases).")
        if self.scale_learning_rate is not None and not self.scale_learning_rate > 0:
            raise ValueError(f"`scale_learning_rate` must be positive or None, got {self.scale_learning_rate!r}.")
        if not isinstance(self.trust_region_size, int) or self.trust_region_size < 1:
            raise ValueError(f"`trust_region_size` must be a positive int, got {self.trust_region_size!r}.")
        if not isinstance(self.representation_samples, int) or self.representation_samples < 1:
            raise ValueError(f"`representation_samples` must be a positive int, got {self.representation_samples!r}.")

    def threshold_for(self, layer_index: int, layer_name: str, num_layers: int, task_index: int) -> float:
        """Energy threshold of one layer after ``task_index`` finished tasks (increment applied, capped at 1)."""
        thresholds = self.energy_threshold
        if isinstance(thresholds, dict):
            if layer_name not in thresholds:
                raise ValueError(f"`energy_threshold` has no entry for layer {layer_name!r}; keys: {sorted(thresholds)}.")
            base = thresholds[layer_name]
        elif isinstance(thresholds, (list, tuple)):
            if len(thresholds) != num_layers:
                raise ValueError(
                    f"`energy_threshold` has {len(thresholds)} values but {num_layers} target layers were found; "
                    "give one per layer (in model order), a single number, or a {name: value} dict."
                )
            base = thresholds[layer_index]
        else:
            base = thresholds
        return min(1.0, base + self.energy_threshold_increment * task_index)
