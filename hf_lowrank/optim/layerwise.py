"""Layer-wise updates: step each parameter inside ``backward`` and free its gradient at once.

A full-rank gradient lives only between the moment autograd finishes accumulating it and the
parameter's update, so the gradients of the whole model never coexist (GaLore §4, "per-layer weight
updates"). Unlike transformers' built-in ``*_layerwise`` optimizers this wrapper

* is ONE optimizer whose ``state_dict()`` is the inner optimizer's real state, so ``Trainer`` checkpoints
  and resumes it (transformers saves a dummy);
* supports gradient accumulation: the step happens on the last micro-batch only (correct, but the
  accumulated gradients then live between micro-batches as without layer-wise: the memory saving is
  full with ``gradient_accumulation_steps=1``);
* shares the inner optimizer's ``param_groups``, so an lr scheduler built on the wrapper drives the
  learning rate used inside the hooks;
* records the true gradient norm of every step (``last_grad_norm``), which
  :class:`hf_lowrank.callbacks.LayerwiseGradNormCallback` puts into the Trainer's logs.

Global gradient clipping (``TrainingArguments.max_grad_norm``) cannot be applied layer-wise: a parameter
is already updated before the norm of the others is known. The callback refuses ``max_grad_norm > 0``, and
fp16 loss scaling (the scaler unscales in ``optimizer.step()``, too late); bf16 works. Checkpoints are the
inner optimizer's own ``state_dict``, so a run can switch between layer-wise and normal steps on resume.
"""
from functools import partial

import torch
from accelerate.state import GradientState
from torch.utils.weak import WeakIdKeyDictionary


# parameter -> the LayerwiseOptimizer whose hook steps it (two hooks would step a parameter twice)
_HOOK_OWNERS = WeakIdKeyDictionary()


def _check_single_process():
    """Layer-wise steps run inside backward, before DDP's gradient all-reduce has finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
        if world_size > 1:
            raise NotImplementedError(
                f"Layer-wise updates (layerwise=True) do not support distributed training yet (world_size="
                f"{world_size}): each parameter is stepped inside backward, before DDP averages its gradient. "
                "Use layerwise=False for multi-process training, or run a single process."
            )


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Runs ``optimizer.step_parameter(param, group)`` from each parameter's post-accumulate-grad hook.

    Args:
        optimizer: the inner optimizer; it must offer ``step_parameter(param, group)`` performing one
            parameter's complete update from ``param.grad`` and ``optimizer.state[param]``.
        model: the model whose parameters ``optimizer`` holds (used to check that and to name parameters).
        gradient_accumulation_steps: ``None`` (default) follows accelerate's ``GradientState().sync_gradients``,
            which ``Trainer`` and ``Accelerator.accumulate`` set on the last micro-batch (and which is ``True``
            when no Accelerator drives the loop, i.e. a step on every backward). An int ``k`` counts backward
            passes per parameter instead and steps on every ``k``-th: use it in a plain loop without accelerate.

    ``step()`` and ``zero_grad()`` exist so training loops keep working: the updates already happened inside
    backward, and the gradients they freed are ``None``.
    """

    def __init__(self, optimizer, model, *, gradient_accumulation_steps=None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"make_layerwise: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer)}.")
        if not callable(getattr(optimizer, "step_parameter", None)):
            raise TypeError(
                f"make_layerwise: {type(optimizer).__name__} has no `step_parameter(param, group)`; layer-wise updates "
                "need an optimizer that can update one parameter at a time, e.g. "
                "hf_lowrank.create_optimizer(model, mode, layerwise=True)."
            )
        if gradient_accumulation_steps is not None and (
            not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1
        ):
            raise ValueError(
                f"make_layerwise: `gradient_accumulation_steps` must be None (follow accelerate/Trainer) or an int "
                f">= 1, got {gradient_accumulation_steps!r}."
            )
        _check_single_process()
        self.optimizer = optimizer
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._param_names = {param: name for name, param in model.named_parameters()}
        self._hooks = []
        self._hooked_params = set()
        self._backward_counts = {}
        self._checked_world_size = False
        self._stepped_params = set()
        self._grad_norm_sq = None
        self._last_grad_norm_sq = None
        self._hook_groups(range(len(optimizer.param_groups)))
        if not self._hooks:
            raise ValueError("make_layerwise: the optimizer holds no parameter with requires_grad=True.")

    # The wrapper has no state of its own: groups, state and defaults are the inner optimizer's (like
    # accelerate's AcceleratedOptimizer), so schedulers and checkpoints see the real thing even after
    # ``load_state_dict`` replaced the inner optimizer's group dicts.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups):
        self.optimizer.param_groups = param_groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    def _hook_groups(self, indices):
        """Check every trainable parameter of these groups, then hook them all (nothing is hooked on error)."""
        params = [(i, p) for i in indices for p in self.optimizer.param_groups[i]["params"] if p.requires_grad]
        for _, param in params:
            if param not in self._param_names:
                raise ValueError(
                    "make_layerwise: the optimizer holds a parameter that is not in `model` (shape "
                    f"{tuple(param.shape)}); build the optimizer from this model's parameters."
                )
            if param in _HOOK_OWNERS:
                raise ValueError(
                    f"make_layerwise: parameter {self._param_names[param]!r} is already stepped by another layer-wise "
                    "optimizer. Call its remove_hooks() (or hf_lowrank.optim.layerwise.remove_layerwise_hooks(model)) "
                    "before building a new one on the same model."
                )
        for index, param in params:
            _HOOK_OWNERS[param] = self
            self._hooked_params.add(param)
            # The group dict is looked up by index at step time: load_state_dict replaces the dicts.
            self._hooks.append(param.register_post_accumulate_grad_hook(partial(self._on_grad_ready, index)))

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)
        self._hook_groups([len(self.optimizer.param_groups) - 1])

    def _is_last_micro_batch(self, param):
        if self.gradient_accumulation_steps is None:
            return GradientState().sync_gradients
        count = (self._backward_counts.get(param, 0) + 1) % self.gradient_accumulation_steps
        self._backward_counts[param] = count
        return count == 0

    @torch.no_grad()
    def _on_grad_ready(self, group_index, param):
        if not self._checked_world_size:  # distributed may have been set up after the optimizer was built
            _check_single_process()
            self._checked_world_size = True
        if not self._is_last_micro_batch(param):
            return  # leave the gradient accumulating
        self._record_grad_norm(param)
        self.optimizer.step_parameter(param, self.optimizer.param_groups[group_index])
        param.grad = None

    def _record_grad_norm(self, param):
        if param in self._stepped_params:  # a new step began before every parameter got a gradient
            self._finish_grad_norm()
        self._stepped_params.add(param)
        norm_sq = torch.linalg.vector_norm(param.grad, dtype=torch.float32).square()
        self._grad_norm_sq = norm_sq if self._grad_norm_sq is None else self._grad_norm_sq + norm_sq
        if len(self._stepped_params) == len(self._hooked_params):
            self._finish_grad_norm()

    def _finish_grad_norm(self):
        if self._stepped_params:
            self._last_grad_norm_sq = self._grad_norm_sq
            self._grad_norm_sq = None
            self._stepped_params.clear()

    @property
    def last_grad_norm(self):
        """2-norm of all gradients of the last step (what ``clip_grad_norm_`` would report), or None before it."""
        if self._last_grad_norm_sq is None:
            return None
        return self._last_grad_norm_sq.sqrt().item()

    def step(self, closure=None):
        """No update happens here (the hooks did it); closes the step's gradient-norm record."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._finish_grad_norm()
        return loss

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def remove_hooks(self):
        """Detach from the model's parameters (after this, nothing updates them)."""
        for hook in self._hooks:
            hook.remove()
        for param in self._hooked_params:
            _HOOK_OWNERS.pop(param, None)
        self._hooks.clear()
        self._hooked_params.clear()

    def __repr__(self):
        return f"LayerwiseOptimizer({self.optimizer!r})"


def make_layerwise(optimizer, model, *, gradient_accumulation_steps=None):
    """Wrap ``optimizer`` so each parameter of ``model`` is updated inside backward; see :class:`LayerwiseOptimizer`."""
    return LayerwiseOptimizer(optimizer, model, gradient_accumulation_steps=gradient_accumulation_steps)


def remove_layerwise_hooks(model):
    """Detach every layer-wise optimizer from ``model``'s parameters (e.g. one whose reference was lost)."""
    owners = {id(owner): owner for param in model.parameters() if (owner := _HOOK_OWNERS.get(param)) is not None}
    for owner in owners.values():
        owner.remove_hooks()
