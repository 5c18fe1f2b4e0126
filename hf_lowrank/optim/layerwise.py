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

Multi-process training:

* **DDP**: a parameter's gradient is only final once DDP's all-reduce of its bucket is done, so under DDP the
  steps run in a DDP communication hook (registered at the first forward of the DDP-wrapped model, or at once when
  the wrapped model is passed): the hook all-reduces the bucket (averaging, as DDP's default hook) and steps the
  bucket's parameters from the reduced values, bucket by bucket in DDP's order, which is the same on every rank.
  Gradient accumulation works through ``no_sync`` on the inner micro-batches (Trainer / ``accelerator.accumulate``
  do it): DDP calls no hook then. DDP's buckets hold one gradient copy whatever the optimizer does; each local
  ``.grad`` is replaced by its view into the reduced bucket as soon as the bucket is stepped, so the saving under
  DDP is the separate gradient tensors and the step's transients, not the bucket copy itself.
* **FSDP2**: ``fully_shard`` runs post-accumulate-grad hooks of the sharded parameters after each reduce-scatter,
  so the same hooks step each row shard as soon as it is reduced, and free it.
* Any other multi-process run (replicas without DDP) is refused at the first backward: each rank would update
  from its own gradient.

Tied embeddings (a causal LM's ``lm_head`` sharing the input embedding, as SmolLM2, small LLaMAs and GPT-2 do) are
the one parameter with two uses in one backward: autograd would hold the head's dense ``vocab x hidden`` gradient
from the start of backward to its end and then add the lookup's gradient into a new tensor, i.e. two or three
full-size gradients at once (113 MB each on SmolLM2-135M). In a single process the wrapper instead lets the head's
gradient land in ``.grad`` at once and adds the looked-up rows into it in place (``index_add_``) when the lookup's
backward runs, then steps the parameter: one full-size gradient, the same update (``inplace_tied_embeddings``;
the lookup must come before the tied use in the forward, as input embeddings before an output head do). Under
DDP / FSDP2 tied embeddings follow autograd's default (their reducers own the gradient).

Global gradient clipping (``TrainingArguments.max_grad_norm``) cannot be applied layer-wise: a parameter
is already updated before the norm of the others is known. The callback refuses ``max_grad_norm > 0``, and
fp16 loss scaling (the scaler unscales in ``optimizer.step()``, too late); bf16 works. Checkpoints are the
inner optimizer's own ``state_dict``, so a run can switch between layer-wise and normal steps on resume.
"""
from functools import partial

import torch
import torch.distributed as dist
from accelerate.state import GradientState
from torch.nn.parallel import DistributedDataParallel
from torch.utils.weak import WeakIdKeyDictionary

from .distributed import is_dtensor, local, world


# parameter -> the LayerwiseOptimizer whose hook steps it (two hooks would step a parameter twice)
_HOOK_OWNERS = WeakIdKeyDictionary()


def unwrap_data_parallel(model):
    """The module inside a DDP wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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
        inplace_tied_embeddings: in a single process, add the lookup gradient of embeddings whose weight another
            module shares into ``.grad`` in place (see the module docstring); ``False``: autograd's default.

    ``step()`` and ``zero_grad()`` exist so training loops keep working: the updates already happened inside
    backward, and the gradients they freed are ``None``.
    """

    def __init__(self, optimizer, model, *, gradient_accumulation_steps=None, inplace_tied_embeddings=True):
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
        if getattr(optimizer, "nonfinite", None) == "skip_step":
            raise ValueError(
                "make_layerwise: the optimizer has nonfinite='skip_step', which cannot be honoured layer-wise (a "
                "parameter is updated before the others' gradients exist). Build it with nonfinite='skip_param' "
                "(create_optimizer(..., layerwise=True) does) or 'raise'."
            )
        ddp = model if isinstance(model, DistributedDataParallel) else None
        model = unwrap_data_parallel(model)
        self.optimizer = optimizer
        self.model = model
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._param_names = {param: name for name, param in model.named_parameters()}
        self._hooks = []
        self._hooked_params = set()
        self._trainer_checked = False  # step() looks for a calling Trainer once
        self._group_index = {}
        self._backward_counts = {}
        self._ddp = None
        self._ddp_ready = {}
        self._stepped_params = set()
        self._grad_norm_sq = None
        self._last_grad_norm_sq = None
        self._active_count = 0
        self._hook_groups(range(len(optimizer.param_groups)))
        if not self._hooks:
            raise ValueError("make_layerwise: the optimizer holds no parameter with requires_grad=True.")
        if ddp is not None:
            self.attach_ddp(ddp)
        self._hooks.append(model.register_forward_pre_hook(self._before_forward))
        self._pending_lookups = {}  # tied embedding weight -> lookups of this backward whose rows are still to come
        if inplace_tied_embeddings and ddp is None and world()[1] == 1:
            self._route_tied_lookups()

    def _route_tied_lookups(self) -> None:
        """Hook the dense embeddings whose (hooked) weight another module shares, so their lookup gradient is added
        in place (see the module docstring)."""
        names = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(param, []).append(name)
        for module in self.model.modules():
            if (isinstance(module, torch.nn.Embedding) and not module.sparse and not module.scale_grad_by_freq
                    and module.max_norm is None and module.weight in self._hooked_params
                    and len(names.get(module.weight, ())) > 1):
                self._hooks.append(module.register_forward_hook(self._tied_lookup_forward))

    def _tied_lookup_forward(self, module, args, output):
        """Detach the lookup from the weight (its gradient then only comes from the tied use) and put a node in
        the graph whose backward adds the looked-up rows in place."""
        weight = module.weight
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return None
        self._pending_lookups[weight] = self._pending_lookups.get(weight, 0) + 1
        anchor = torch.empty(0, device=output.device, requires_grad=True)  # makes the output require grad
        return _LookupRows.apply(output.detach(), anchor, partial(self._add_lookup_rows, module, args[0]))

    @torch.no_grad()
    def _add_lookup_rows(self, module, ids, grad):
        weight = module.weight
        rows, values = ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        if module.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            values = values * (rows != module.padding_idx).unsqueeze(1).to(values.dtype)
        if weight.grad is None:  # the tied use got no gradient in this backward
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, rows, values)
        left = self._pending_lookups.get(weight, 1) - 1
        if left > 0:
            self._pending_lookups[weight] = left
            return
        self._pending_lookups.pop(weight, None)
        self._on_grad_ready(self._group_index[weight], weight)

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
        """Check every trainable, not yet hooked parameter of these groups, then hook them all (nothing is hooked
        on error)."""
        params = [(i, p) for i in indices for p in self.optimizer.param_groups[i]["params"]
                  if p.requires_grad and p not in self._hooked_params]
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
            self._group_index[param] = index
            self._hooks.append(param.register_post_accumulate_grad_hook(partial(self._on_grad_ready, index)))
        self._active_count = sum(p.requires_grad for p in self._hooked_params)

    def hook_new_trainable(self) -> None:
        """Hook the optimizer's parameters that became trainable since the last call (e.g. blocks a layer-sampling
        callback unfroze). Runs by itself before every forward of the model."""
        self._hook_groups(range(len(self.optimizer.param_groups)))

    def release_state(self, params) -> int:
        """Free the optimizer state of ``params`` (see ``ProjectedOptimizer.release_state``)."""
        return self.optimizer.release_state(params)

    def _before_forward(self, module, args):
        self.hook_new_trainable()  # also recounts the hooked parameters that train now
        ddp = DistributedDataParallel._get_active_ddp_module()
        # Trainer / accelerate wrap the model after the optimizer is built: attach at its first DDP forward
        if self._ddp is None and ddp is not None and unwrap_data_parallel(ddp) is self.model:
            self.attach_ddp(ddp)

    # --- DDP -----------------------------------------------------------------------------------------

    def attach_ddp(self, ddp_model: DistributedDataParallel) -> None:
        """Step this optimizer's parameters from DDP's reduced buckets (a communication hook on ``ddp_model``)."""
        if unwrap_data_parallel(ddp_model) is not self.model:
            raise ValueError("attach_ddp: `ddp_model` does not wrap the model this layer-wise optimizer was built on.")
        try:
            ddp_model.register_comm_hook(ddp_model.process_group, self._ddp_comm_hook)
        except RuntimeError as err:
            raise RuntimeError(
                "Layer-wise updates under DDP need DDP's communication hook, and this DDP model already has one "
                f"({err}). Remove the other hook (e.g. accelerate's DistributedDataParallelKwargs(comm_hook=...))."
            ) from None
        self._ddp = ddp_model

    def _ddp_comm_hook(self, process_group, bucket):
        """All-reduce (average) the bucket, then step its parameters from the reduced values on the last
        micro-batch. Runs in DDP's bucket order, identical on every rank, so refresh broadcasts line up."""
        group = process_group if process_group is not None else dist.group.WORLD
        buffer = bucket.buffer()
        buffer.div_(dist.get_world_size(group))
        work = dist.all_reduce(buffer, group=group, async_op=True)
        ready = [p for p in bucket.parameters() if self._ddp_ready.pop(p, False)]
        if not ready:  # not the last micro-batch (or none of ours): DDP's plain averaged all-reduce
            return work.get_future().then(lambda fut: fut.value()[0])
        work.wait()
        ready = set(ready)
        by_group = {}
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            if param in ready:
                # The reduced values, a view into the bucket: the local gradient is freed now, and DDP's final
                # bucket-to-grad copy then writes onto itself instead of allocating every gradient again.
                param.grad = grad
                self._record_grad_norm(param)
                by_group.setdefault(self._group_index[param], []).append(param)
        for index, params in sorted(by_group.items()):  # one call per group: the bucket's refreshes share a round
            step_many = getattr(self.optimizer, "step_parameters", None)
            if step_many is not None:
                step_many(params, self.optimizer.param_groups[index])
            else:
                for param in params:
                    self.optimizer.step_parameter(param, self.optimizer.param_groups[index])
        done = torch.futures.Future()
        done.set_result(buffer)
        return done

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
        if self._pending_lookups.get(param):  # a tied embedding: the lookup's rows are added (and it steps) later
            return
        if self._ddp is not None:  # DDP's communication hook steps it once its bucket is reduced; this hook runs
            self._ddp_ready[param] = self._is_last_micro_batch(param)  # before DDP's, on every backward
            return
        if not is_dtensor(param) and world()[1] > 1:
            raise RuntimeError(
                f"Layer-wise updates in a {world()[1]}-process run, but parameter {self._param_names[param]!r} is "
                "neither in a DDP-wrapped model nor an FSDP2 shard: each rank would update from its own gradient. "
                "Wrap the model in DistributedDataParallel (Trainer / accelerate launch do) or shard it with "
                "fully_shard; with a hand-made loop pass the DDP model to create_optimizer / make_layerwise."
            )
        if not self._is_last_micro_batch(param):
            return  # leave the gradient accumulating
        self._step(param, group_index)

    def _step(self, param, group_index):
        self._record_grad_norm(param)
        self.optimizer.step_parameter(param, self.optimizer.param_groups[group_index])
        param.grad = None

    def _record_grad_norm(self, param):
        if param in self._stepped_params:  # a new step began before every parameter got a gradient
            self._finish_grad_norm()
        self._stepped_params.add(param)
        norm_sq = torch.linalg.vector_norm(local(param.grad), dtype=torch.float32).square()
        self._grad_norm_sq = norm_sq if self._grad_norm_sq is None else self._grad_norm_sq + norm_sq
        if len(self._stepped_params) == self._active_count:
            self._finish_grad_norm()

    def _finish_grad_norm(self):
        if self._stepped_params:
            if any(is_dtensor(p) for p in self._stepped_params):  # FSDP2: each rank summed its own rows
                dist.all_reduce(self._grad_norm_sq)
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
        """No update happens here (the hooks did it); closes the step's gradient-norm record. Under ``Trainer``,
        the first call makes sure its layer-wise checks and grad_norm logging are active (see
        :func:`hf_lowrank.callbacks.attach_to_calling_trainer`)."""
        if not self._trainer_checked:
            from ..callbacks import attach_to_calling_trainer

            self._trainer_checked = True
            attach_to_calling_trainer(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._finish_grad_norm()
        self._pending_lookups.clear()  # a forward whose loss was never backpropagated
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
        self._pending_lookups.clear()

    def __repr__(self):
        return f"LayerwiseOptimizer({self.optimizer!r})"


class _LookupRows(torch.autograd.Function):
    """Identity on an embedding's (detached) output whose backward hands the output gradient to ``add_rows``."""

    @staticmethod
    def forward(ctx, embedded, anchor, add_rows):
        ctx.add_rows = add_rows
        return embedded.view_as(embedded)

    @staticmethod
    def backward(ctx, grad):
        ctx.add_rows(grad)
        return None, None, None


def make_layerwise(optimizer, model, *, gradient_accumulation_steps=None, inplace_tied_embeddings=True):
    """Wrap ``optimizer`` so each parameter of ``model`` is updated inside backward; see :class:`LayerwiseOptimizer`."""
    return LayerwiseOptimizer(optimizer, model, gradient_accumulation_steps=gradient_accumulation_steps,
                              inplace_tied_embeddings=inplace_tied_embeddings)


def remove_layerwise_hooks(model):
    """Detach every layer-wise optimizer from ``model``'s parameters (e.g. one whose reference was lost)."""
    owners = {id(owner): owner for param in model.parameters() if (owner := _HOOK_OWNERS.get(param)) is not None}
    for owner in owners.values():
        owner.remove_hooks()
