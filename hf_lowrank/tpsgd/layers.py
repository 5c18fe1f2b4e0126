"""Split an `nn.Sequential` into the layers tpSGD trains one at a time.

A layer ("block") is one trainable module followed by the parameter-free modules up to the next trainable one:

* `nn.Linear`, `nn.Conv1d`, `nn.Conv2d`: the local loss is taken after the element-wise modules that follow
  (activations, dropout) and before the first one that changes the shape (pooling, flatten, ...), as in DRTP;
  the shape-changing rest runs without a graph since its output is detached anyway.
* `nn.RNN`, `nn.GRU`, `nn.LSTM` (unidirectional, no `proj_size`): each of the `num_layers` stacked layers is
  its own block, unrolled with its cell; the local loss is taken on the hidden state of every time step (target
  from one P_i, or from P_{i,t} per step with `TpSGDConfig.recurrent_projection="per_step"`) and the previous
  hidden (and cell) state is a constant input, so nothing is backpropagated through time. The per-step losses
  are averaged, or weighted toward later steps with `TpSGDConfig.recurrent_step_weights="linear"`. Put
  `LastTimeStep()` after the recurrent module to feed its last hidden state to the next layer.

Parameter-free modules before the first trainable module are an input prefix. Anything else that holds
parameters (normalisation, embeddings, attention, custom modules) is refused with an error naming it.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn


FEEDFORWARD_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
RECURRENT_TYPES = (nn.RNN, nn.GRU, nn.LSTM)
ELEMENTWISE_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
    nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
)
SUPPORTED = (
    "nn.Sequential (nested allowed) of nn.Linear / nn.Conv1d / nn.Conv2d, nn.RNN / nn.GRU / nn.LSTM "
    "(unidirectional, no proj_size; follow them with hf_lowrank.tpsgd.LastTimeStep) and parameter-free modules "
    "(activations, dropout, pooling, flatten)"
)


class LastTimeStep(nn.Module):
    """Pick the last time step of a recurrent module's output (accepts the `(output, h_n)` tuple)."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first

    def forward(self, x):
        if isinstance(x, tuple):
            x = x[0]
        return x[:, -1] if self.batch_first else x[-1]


@dataclass
class FeedForwardBlock:
    """`module`, then the element-wise `activations` (local loss here), then the shape-changing `rest`."""

    name: str
    module: nn.Module
    activations: List[nn.Module] = field(default_factory=list)
    rest: List[nn.Module] = field(default_factory=list)

    def parameters(self):
        return list(self.module.parameters())


@dataclass
class RecurrentBlock:
    """Layer `layer` of the stacked recurrent `module`; `rest` follows only the module's top layer."""

    name: str
    module: nn.Module
    layer: int
    rest: List[nn.Module] = field(default_factory=list)

    @property
    def is_top(self) -> bool:
        return self.layer == self.module.num_layers - 1

    def weights(self) -> Tuple[torch.Tensor, ...]:
        suffix = f"_l{self.layer}"
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.module.bias else [])
        weights = [getattr(self.module, name + suffix) for name in names]
        return tuple(weights) if self.module.bias else (*weights, None, None)

    def parameters(self):
        return [w for w in self.weights() if w is not None]

    def cell(self, x_t: torch.Tensor, state):
        """One time step; `state` is h (RNN/GRU) or (h, c) (LSTM). Returns the new state."""
        w_ih, w_hh, b_ih, b_hh = self.weights()
        if isinstance(self.module, nn.LSTM):
            return torch.lstm_cell(x_t, state, w_ih, w_hh, b_ih, b_hh)
        if isinstance(self.module, nn.GRU):
            return torch.gru_cell(x_t, state, w_ih, w_hh, b_ih, b_hh)
        step = torch.rnn_tanh_cell if self.module.nonlinearity == "tanh" else torch.rnn_relu_cell
        return step(x_t, state, w_ih, w_hh, b_ih, b_hh)

    def initial_state(self, batch: int, like: torch.Tensor):
        h = like.new_zeros(batch, self.module.hidden_size)
        return (h, h.clone()) if isinstance(self.module, nn.LSTM) else h


Block = Union[FeedForwardBlock, RecurrentBlock]


@dataclass
class LayerPlan:
    prefix: List[nn.Module]
    blocks: List[Block]

    @property
    def hidden(self) -> List[Block]:
        return self.blocks[:-1]

    @property
    def output(self) -> FeedForwardBlock:
        return self.blocks[-1]


def _flatten(module: nn.Sequential, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    flat = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            flat.extend(_flatten(child, full + "."))
        else:
            flat.append((full, child))
    return flat


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _check_recurrent(name: str, module: nn.Module) -> None:
    problems = []
    if module.bidirectional:
        problems.append("bidirectional=True")
    if getattr(module, "proj_size", 0):
        problems.append(f"proj_size={module.proj_size}")
    if problems:
        raise ValueError(
            f"TpSGD does not support module '{name}' ({type(module).__name__} with {', '.join(problems)}): the "
            "local target is projected onto a causal hidden state. Use a unidirectional module without proj_size."
        )


def _takes_activations(block: Block) -> bool:
    """A feed-forward block takes element-wise modules until its first shape-changing one."""
    return isinstance(block, FeedForwardBlock) and not block.rest


def plan_layers(network: nn.Module) -> LayerPlan:
    """Group the modules of `network` into blocks, refusing what tpSGD cannot train layer-locally."""
    if not isinstance(network, nn.Sequential):
        raise TypeError(
            f"TpSGD trains an nn.Sequential layer by layer; got {type(network).__name__}. Supported: {SUPPORTED}."
        )
    prefix: List[nn.Module] = []
    blocks: List[Block] = []
    for name, module in _flatten(network):
        if isinstance(module, FEEDFORWARD_TYPES):
            blocks.append(FeedForwardBlock(name, module))
        elif isinstance(module, RECURRENT_TYPES):
            _check_recurrent(name, module)
            blocks.extend(RecurrentBlock(f"{name}.l{k}", module, k) for k in range(module.num_layers))
        elif _has_parameters(module):
            raise ValueError(
                f"TpSGD does not support module '{name}' ({type(module).__name__}). Supported: {SUPPORTED}."
            )
        elif not blocks:
            prefix.append(module)
        elif isinstance(module, ELEMENTWISE_TYPES) and _takes_activations(blocks[-1]):
            blocks[-1].activations.append(module)
        else:
            blocks[-1].rest.append(module)
    if len(blocks) < 2:
        raise ValueError(
            f"TpSGD needs at least one hidden layer before the output layer; found {len(blocks)} trainable layer(s)."
        )
    if not isinstance(blocks[-1], FeedForwardBlock):
        raise ValueError(
            f"The last trainable module '{blocks[-1].name}' is recurrent; TpSGD trains the last layer on the task "
            "loss and needs it to be nn.Linear/nn.Conv (add LastTimeStep() and an nn.Linear head)."
        )
    return LayerPlan(prefix, blocks)


def run_modules(modules: Sequence[nn.Module], x):
    for module in modules:
        x = module(x)
    return x


def infer_num_labels(plan: LayerPlan) -> Optional[int]:
    head = plan.output.module
    return head.out_features if isinstance(head, nn.Linear) else None
