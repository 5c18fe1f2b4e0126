"""Configuration of tpSGD (target-projection SGD), its DRTP special case and the backprop baseline."""
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union


MODES = ("tpsgd", "drtp", "bp")
LOCAL_LOSSES = ("mse", "l1", "bce", "cross_entropy")
TARGET_ACTIVATIONS = ("tanh", "sigmoid", "softmax", "none")
PROJECTIONS = ("gaussian", "uniform", "kaiming_uniform")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
OUTPUT_LOSSES = ("cross_entropy", "bce", "mse")
RECURRENT_PROJECTIONS = ("shared", "per_step")
RECURRENT_STEP_WEIGHTS = ("uniform", "linear")

# The squashing each local loss needs its targets in: BCE wants [0, 1], cross-entropy a distribution.
DEFAULT_TARGET_ACTIVATION = {"mse": "tanh", "l1": "tanh", "bce": "sigmoid", "cross_entropy": "softmax"}
ALLOWED_TARGET_ACTIVATIONS = {
    "mse": TARGET_ACTIVATIONS,
    "l1": TARGET_ACTIVATIONS,
    "bce": ("sigmoid", "softmax"),
    "cross_entropy": ("softmax",),
}


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"TpSGDConfig.{name}={value!r} is not supported; choose one of {', '.join(choices)}.")


@dataclass
class TpSGDConfig:
    """How a network is trained layer by layer without backpropagation (tpSGD, arXiv 2208.08503).

    Every hidden layer i owns a fixed random matrix P_i (regenerated from `seed`, never stored) that maps the
    one-hot label y* to a local target t_i = squash(y* P_i); the layer is updated on its own loss
    l(h_i, t_i) and its output is detached before the next layer. The last layer is trained on the task loss.
    `mode="drtp"` is Direct Random Target Projection (Frenkel et al. 2019), `mode="bp"` plain backprop with the
    same model, data and optimizer.
    """

    mode: str = field(default="tpsgd", metadata={"help": f"Training rule: one of {MODES}."})
    local_loss: Union[str, Sequence[str]] = field(
        default="mse",
        metadata={
            "help": f"Local loss of the hidden layers, one of {LOCAL_LOSSES}, or a list with one per hidden layer. "
            "Losses are summed over a layer's units and averaged over the batch; 'bce' and 'cross_entropy' "
            "read the layer output as logits (cross_entropy: a softmax over all units of the layer)."
        },
    )
    target_activation: Optional[str] = field(
        default=None,
        metadata={
            "help": f"Squashing f of the projected label, t = f(y* P), one of {TARGET_ACTIVATIONS}. Default: tanh "
            "for mse/l1, sigmoid for bce, softmax for cross_entropy."
        },
    )
    projection: str = field(
        default="gaussian",
        metadata={
            "help": f"Distribution of the P matrices, one of {PROJECTIONS}: gaussian N(0, scale^2), uniform "
            "U(-scale, scale), kaiming_uniform scale * U(-sqrt(6/n), sqrt(6/n)) with n the layer width (DRTP's)."
        },
    )
    projection_scale: float = field(default=1.0, metadata={"help": "Scale of the P matrices (see `projection`)."})
    recurrent_projection: str = field(
        default="shared",
        metadata={
            "help": f"Targets of recurrent layers, one of {RECURRENT_PROJECTIONS}. 'shared': one P_i for every time "
            "step. 'per_step': time step t has its own P_{i,t} (also regenerated from `seed`). With a shared P the "
            "state settles on the label code after a few steps and later inputs barely move it (the state at t-1, "
            "a constant input, already meets step t's target); per-step targets make every step re-encode the "
            "state and take in its input, which is much better on row-by-row digits (benchmarks/results/tpsgd.md). "
            "The readout after the layer sees the last step's code P_{i,T}. Not "
            "with mode='drtp', whose definition is one fixed B per layer. Feed-forward layers ignore it."
        },
    )
    recurrent_step_weights: str = field(
        default="uniform",
        metadata={
            "help": f"How a recurrent layer's local loss weighs its T time steps, one of {RECURRENT_STEP_WEIGHTS}: "
            "'uniform' 1/T each, 'linear' t / (1 + ... + T) for t = 1..T, so early steps, whose inputs say "
            "little about the label yet, count less than the last ones the readout sees."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed the P matrices are regenerated from (only this is saved)."})
    optimizer: str = field(
        default="adam",
        metadata={
            "help": f"Inner optimizer, one of {OPTIMIZERS}; each layer gets its own parameter group. The learning "
            "rate, weight decay and Adam betas/epsilon come from TrainingArguments."
        },
    )
    momentum: float = field(default=0.9, metadata={"help": "Momentum of the 'momentum' and 'nesterov' optimizers."})
    output_loss: str = field(
        default="cross_entropy",
        metadata={
            "help": f"Task loss of the last layer on its logits, one of {OUTPUT_LOSSES} (bce/mse against the one-hot "
            "label; DRTP's paper setup is bce)."
        },
    )
    num_labels: Optional[int] = field(
        default=None,
        metadata={"help": "Number of classes; inferred from the last layer when None, checked when given."},
    )
    input_name: str = field(default="inputs", metadata={"help": "Key of the model input in each batch."})

    def __post_init__(self):
        _check_choice("mode", self.mode, MODES)
        _check_choice("projection", self.projection, PROJECTIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("output_loss", self.output_loss, OUTPUT_LOSSES)
        _check_choice("recurrent_projection", self.recurrent_projection, RECURRENT_PROJECTIONS)
        _check_choice("recurrent_step_weights", self.recurrent_step_weights, RECURRENT_STEP_WEIGHTS)
        if self.mode == "drtp" and self.recurrent_projection != "shared":
            raise ValueError(
                "TpSGDConfig.recurrent_projection='per_step' does not fit mode='drtp': DRTP is defined with one fixed "
                "B per layer. Use recurrent_projection='shared' with DRTP, or mode='tpsgd'."
            )
        if isinstance(self.local_loss, str):
            losses = [self.local_loss]
        else:
            self.local_loss = list(self.local_loss)
            losses = self.local_loss
            if not losses:
                raise ValueError("TpSGDConfig.local_loss is an empty list; give a loss name or one per hidden layer.")
        for loss in losses:
            _check_choice("local_loss", loss, LOCAL_LOSSES)
        if self.target_activation is not None:
            _check_choice("target_activation", self.target_activation, TARGET_ACTIVATIONS)
            for loss in losses:
                if self.target_activation not in ALLOWED_TARGET_ACTIVATIONS[loss]:
                    raise ValueError(
                        f"TpSGDConfig.target_activation={self.target_activation!r} does not fit local_loss={loss!r}, "
                        f"whose targets must be squashed with one of {ALLOWED_TARGET_ACTIVATIONS[loss]}."
                    )
        if not self.projection_scale > 0:
            raise ValueError(f"TpSGDConfig.projection_scale must be > 0, got {self.projection_scale}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TpSGDConfig.momentum must be in [0, 1), got {self.momentum}.")
        if self.num_labels is not None and self.num_labels < 2:
            raise ValueError(f"TpSGDConfig.num_labels must be >= 2, got {self.num_labels}.")
        if not isinstance(self.seed, int):
            raise TypeError(f"TpSGDConfig.seed must be an int, got {type(self.seed).__name__}.")

    def loss_of_layer(self, index: int, num_hidden: int) -> str:
        """The local loss of hidden layer `index` (of `num_hidden`)."""
        if isinstance(self.local_loss, str):
            return self.local_loss
        if len(self.local_loss) != num_hidden:
            raise ValueError(
                f"TpSGDConfig.local_loss lists {len(self.local_loss)} losses but the model has {num_hidden} hidden "
                "layers; give one loss per hidden layer or a single name."
            )
        return self.local_loss[index]

    def squash_of(self, loss: str) -> str:
        return self.target_activation or DEFAULT_TARGET_ACTIVATION[loss]

    def to_dict(self) -> dict:
        return asdict(self)
