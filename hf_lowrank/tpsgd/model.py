"""`TpSGDModel`: wraps an `nn.Sequential` so the Trainer can run it, and performs the layer-local step."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .config import TpSGDConfig
from .layers import FeedForwardBlock, LayerPlan, RecurrentBlock, infer_num_labels, plan_layers, run_modules
from .memory import SavedTensorTracker
from .projection import (
    local_loss_and_grad, one_hot_labels, projection_matrix, squash, task_loss, task_loss_and_grad,
)


def activate_with_derivative(modules, z: torch.Tensor):
    """(f(z), f'(z)) for a chain f of element-wise modules (f'(z) is None when there are none).

    Forward-mode AD with a tangent of ones gives the diagonal of f's Jacobian in the same pass as f(z), and
    saves nothing for a backward pass.
    """
    if not modules:
        return z, None
    with torch.no_grad(), forward_ad.dual_level():
        out = run_modules(modules, forward_ad.make_dual(z, torch.ones_like(z)))
        h, derivative = forward_ad.unpack_dual(out)
    return h, derivative


def recurrent_step_weights(name: str, steps: int) -> List[float]:
    """Weights of the `steps` per-step local losses of a recurrent layer (they sum to 1)."""
    raw = [1.0] * steps if name == "uniform" else [float(t) for t in range(1, steps + 1)]
    return [w / sum(raw) for w in raw]


class TpSGDModel(nn.Module):
    """An `nn.Sequential` classifier (see `hf_lowrank.tpsgd.layers` for what it may contain) plus tpSGD state.

    `forward(inputs, labels)` is the ordinary network (used for evaluation and the BP baseline);
    `local_step(inputs, labels)` runs tpSGD/DRTP: one layer at a time, forward, local gradient, graph freed.
    A Linear/Conv layer keeps only its input for the update (the fused step below), so the peak saved
    activation is the widest layer input, max_i n_{i-1}, against backprop's sum_i n_i; a recurrent layer keeps
    one time step's cell graph. The P matrices are rebuilt from `config.seed` on first use and never enter `state_dict`.
    """

    def __init__(self, network: nn.Sequential, config: Optional[TpSGDConfig] = None):
        super().__init__()
        self.tpsgd_config = cfg = config or TpSGDConfig()
        self.network = network
        self.plan: LayerPlan = plan_layers(network)
        inferred = infer_num_labels(self.plan)
        head = self.plan.output
        if cfg.num_labels is None and inferred is None:
            raise ValueError(
                f"Cannot infer the number of classes from the output layer '{head.name}' "
                f"({type(head.module).__name__}); set TpSGDConfig.num_labels."
            )
        if cfg.num_labels is not None and inferred is not None and cfg.num_labels != inferred:
            raise ValueError(
                f"TpSGDConfig.num_labels={cfg.num_labels} but the output layer '{head.name}' has {inferred} outputs; "
                "they must match (P has one row per class)."
            )
        self.num_labels = cfg.num_labels or inferred
        num_hidden = len(self.plan.hidden)
        self.layer_losses = [cfg.loss_of_layer(i, num_hidden) for i in range(num_hidden)]
        # (layer, width, step, device, dtype) -> P, drawn once on CPU (the same P on every device) and kept placed
        self._projections: Dict[Tuple, torch.Tensor] = {}
        self.memory = SavedTensorTracker(self.network.parameters)

    @property
    def num_layers(self) -> int:
        return len(self.plan.blocks)

    def layer_parameter_groups(self) -> List[List[nn.Parameter]]:
        """Trainable parameters of each block, in order (one optimizer group per layer)."""
        return [[p for p in block.parameters() if p.requires_grad] for block in self.plan.blocks]

    def projection(self, layer: int, width: int, like: torch.Tensor, step: Optional[int] = None) -> torch.Tensor:
        """P of hidden layer `layer` (of time step `step` with recurrent_projection='per_step'), cached on `like`'s
        device and dtype (no copy per call)."""
        key = (layer, width, step, like.device, like.dtype)
        if key not in self._projections:
            cfg = self.tpsgd_config
            self._projections[key] = projection_matrix(
                cfg.projection, cfg.projection_scale, cfg.seed, layer, self.num_labels, width, step
            ).to(device=like.device, dtype=like.dtype)
        return self._projections[key]

    def forward(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None) -> SequenceClassifierOutput:
        logits = self.network(inputs)
        self._check_logits(logits)
        loss = None
        if labels is not None:
            one_hot = one_hot_labels(labels, self.num_labels, logits.dtype)
            loss = task_loss(self.tpsgd_config.output_loss, logits, one_hot)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_labels:
            raise ValueError(
                f"The network must output logits of shape (batch, {self.num_labels}); got {tuple(logits.shape)}."
            )

    # ---- layer-local training -------------------------------------------------------------------------------

    def _hidden_grad(self, layer: int, h: torch.Tensor, one_hot: torch.Tensor, scale: float, step=None):
        """(local loss, dL/dh) for the hidden output h (batch, ...) of hidden layer `layer` (at time `step`)."""
        flat = h.detach().reshape(h.shape[0], -1)
        P = self.projection(layer, flat.shape[1], flat, step)
        one_hot = one_hot.to(flat.dtype)
        if self.tpsgd_config.mode == "drtp":
            # DRTP: the gradient estimate at the layer output is labels.mm(B), summed over the batch.
            grad = one_hot @ P
            return (flat * grad).sum() / flat.shape[0], grad.view_as(h) * scale
        loss = self.layer_losses[layer]
        target = squash(self.tpsgd_config.squash_of(loss), one_hot @ P)
        value, grad = local_loss_and_grad(loss, flat, target)
        return value, grad.view_as(h) * scale

    def _feedforward_step(self, index: int, block: FeedForwardBlock, x, one_hot, scale):
        """Fused local step of Linear/Conv + element-wise activations: only the layer input is kept for the update.

        The activation runs outside autograd with its derivative from forward-mode AD, the local gradient
        delta = dl/dh * f'(z) is formed right away, and only the Linear/Conv op's graph (which saves its input x
        for the weight gradient) is backpropagated. The output h is never saved; it goes on to the next layer.
        """
        with self.memory.track(index):
            z = block.module(x)
            h, derivative = activate_with_derivative(block.activations, z.detach())
            value, grad = self._hidden_grad(index, h, one_hot, scale)
            z.backward(grad if derivative is None else grad * derivative)
        with torch.no_grad():
            return value, run_modules(block.rest, h).contiguous()

    def _recurrent_step(self, index: int, block: RecurrentBlock, x, one_hot, scale, lower_states):
        """Unroll one recurrent layer; each time step is its own graph, the previous state a constant.

        Step t's target comes from P_i, or from P_{i,t} with `recurrent_projection="per_step"`; its loss is
        weighted by `recurrent_step_weights` (the weights sum to 1).

        `lower_states` holds the final states of the layers below in the same module, so the top layer can
        hand the module's own `(output, h_n)` to what follows. Returns (local loss, output, states so far).
        """
        module = block.module
        seq = x.transpose(0, 1) if module.batch_first else x  # (time, batch, features)
        steps = seq.shape[0]
        state = block.initial_state(seq.shape[1], seq)
        outputs, total = [], 0.0
        per_step = self.tpsgd_config.recurrent_projection == "per_step"
        weights = recurrent_step_weights(self.tpsgd_config.recurrent_step_weights, steps)
        for t in range(steps):
            with self.memory.track(index):
                new_state = block.cell(seq[t], state)
                h = new_state[0] if isinstance(new_state, tuple) else new_state
                value, grad = self._hidden_grad(index, h, one_hot, scale * weights[t], t if per_step else None)
                h.backward(grad)
            total += value * weights[t]
            state = tuple(s.detach() for s in new_state) if isinstance(new_state, tuple) else new_state.detach()
            outputs.append(h.detach())
        out = torch.stack(outputs, dim=1 if module.batch_first else 0)
        states = lower_states + [state if isinstance(state, tuple) else (state,)]
        if not block.is_top:
            if module.dropout and self.training:
                out = F.dropout(out, module.dropout, training=True)
            return total, out, states
        stacked = tuple(torch.stack(parts, dim=0) for parts in zip(*states))
        h_n = stacked if isinstance(module, nn.LSTM) else stacked[0]
        with torch.no_grad():
            out = run_modules(block.rest, (out, h_n))
        # a view (e.g. LastTimeStep) would keep the whole sequence alive in the next layer's graph
        return total, out.contiguous() if torch.is_tensor(out) else out, []

    def local_step(self, inputs: torch.Tensor, labels: torch.Tensor, scale: float = 1.0):
        """Accumulate tpSGD (or DRTP) gradients into `.grad` of every layer; returns (task loss, local losses).

        `scale` multiplies every gradient (the Trainer passes 1 / gradient_accumulation_steps).
        """
        with torch.no_grad():
            x = run_modules(self.plan.prefix, inputs)
        one_hot = one_hot_labels(labels.to(inputs.device), self.num_labels, torch.get_default_dtype())
        local_losses, states = [], []
        for index, block in enumerate(self.plan.hidden):
            if isinstance(block, RecurrentBlock):
                value, x, states = self._recurrent_step(
                    index, block, x, one_hot, scale, states if block.layer > 0 else []
                )
            else:
                value, x = self._feedforward_step(index, block, x, one_hot, scale)
            local_losses.append(float(value))
        return self._output_step(x, one_hot, scale), local_losses

    def _output_step(self, x, one_hot, scale):
        """Last layer on the task loss, differentiated in closed form so its op saves only its input too.

        Modules after the last Linear/Conv (activations, flatten) get a small autograd graph of their own.
        """
        head = self.plan.output
        with self.memory.track(len(self.plan.hidden)):
            z = head.module(x)
            z_free = z.detach().requires_grad_()
            logits = run_modules(head.rest, run_modules(head.activations, z_free))
            self._check_logits(logits)
            loss, grad = task_loss_and_grad(self.tpsgd_config.output_loss, logits.detach(), one_hot.to(logits.dtype))
            if logits is not z_free:
                (grad,) = torch.autograd.grad(logits, z_free, grad)
            z.backward(grad * scale)
        return loss
