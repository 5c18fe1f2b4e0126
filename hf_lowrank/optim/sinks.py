"""Update sinks: how an optimizer writes into a weight it cannot add to in place (e.g. INT8 codes).

A parameter with a sink (``attach_update_sink``) is stepped through it: the optimizer asks for a float working
copy (``begin``), applies the whole update to it (projected step, residual, weight decay), then hands it back
(``commit``) with the step's device-side ``ok`` flag (0.0: the step was skipped, leave the weight as it was) and
the parameter's step count (a deterministic seed for stochastic rounding, so a resumed run re-draws the same
noise). The optimizer never learns how the weight is stored.
"""
from typing import Protocol

import torch


class UpdateSink(Protocol):
    def begin(self) -> torch.Tensor:
        """A float tensor holding the current weight, which the optimizer may modify in place."""

    def commit(self, value: torch.Tensor, ok: torch.Tensor, step: int) -> None:
        """Store ``value`` as the new weight where ``ok`` is 1.0 (a 0-dim device tensor); ``step`` counts updates."""


_SINK_ATTRIBUTE = "_hf_lowrank_update_sink"


def attach_update_sink(param: torch.Tensor, sink: UpdateSink) -> None:
    setattr(param, _SINK_ATTRIBUTE, sink)


def update_sink_of(param: torch.Tensor) -> UpdateSink | None:
    return getattr(param, _SINK_ATTRIBUTE, None)
