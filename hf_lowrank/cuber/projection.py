"""Gradient projection (GPM), TRGP's scaled weight projection and CUBER's regimes (Algorithm 1 of the paper).

CUBER (Lin et al., NeurIPS 2022, arXiv 2211.00789) classifies, per layer ``l`` and old task ``j``, the new task's
gradient ``g`` taken at the start of the task (the model of the previous task, a sample of the new task's data):

- sufficient projection (Definition 1): ``||g B_j B_jᵀ|| >= ε_1 ||g||``;
- positive correlation (Definition 2): ``<g_j, g> >= ε_2 ||g_j|| ||g||``, with ``g_j`` old task ``j``'s layer
  gradient stored at the end of its training (``correlation_test="projection"`` compares ``g B_j`` and
  ``g_j B_j`` instead, our earlier reconstruction).

Of the old tasks with sufficient projection, the ``trust_region_size`` with the largest projection (TRGP's trust
region) are in regime 3 when positively correlated and in regime 2 otherwise; every other old task is in regime 1.
Regimes 2 and 3 learn TRGP's scale ``Q_j`` (:class:`ScaledWeightProjection`). The gradient of ``W`` loses its
components in the subspaces of regime-1/2 tasks; regime 3 keeps its component (:class:`LayerProjection`) and the
loss gets ``λ ||(W − W^{t−1}) B_j B_jᵀ||`` (Eq. 3); a regime-3 task whose condition fails on a step's gradient drops to
regime 2 for the rest of the task (Algorithm 1, lines 9-12; :class:`BackwardTransfer`).

Choices the paper leaves open, made here (and tested in ``tests/test_cuber.py``):

- "removing the components in the subspaces of regime-1/2 tasks" is done against the union basis ``M`` of all
  old tasks, as GPM does (the sum of per-task projections would remove overlaps twice); the kept subspace ``A``
  is the span of the regime-3 bases minus the span of every other old task's basis, so protected tasks keep GPM's
  guarantee where their subspaces overlap a regime-3 one: ``g' = s·g P_A + (g − g P_A)(I − M Mᵀ)`` with
  ``s = backward_scale`` (1, the paper);
- the penalty's gradient ``λ Δ P_j / ||Δ P_j||`` (``Δ = W − W^{t−1}``, ``P_j = B_j B_jᵀ``; zero at ``Δ P_j = 0``) is
  added to the layer gradient right before the optimizer step, after the demotion test has seen the task loss's own
  gradient, and after Trainer's gradient clipping (the penalty is not clipped);
- the per-step test reads one number per (layer, regime-3 task) from the device: one host synchronisation per step,
  only while some layer has a regime-3 task.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .memory import LayerMemory, weight_matrix


REGIME_WEAK, REGIME_STRONG, REGIME_POSITIVE = 1, 2, 3


@dataclass
class Correlation:
    """Outcome of the two tests for one (layer, old task) pair (before the trust-region selection)."""

    projection_ratio: float  # ||g B_j|| / ||g||
    cosine: float  # cos(g, g_j) (or cos(g B_j, g_j B_j)); 0.0 when a gradient is zero
    regime: int  # WEAK (insufficient projection), STRONG (sufficient, not correlated) or POSITIVE (both)


def gradient_cosine(grad: torch.Tensor, basis: torch.Tensor, old_grad: torch.Tensor, on: str = "gradient"):
    """``(cosine, defined)`` between a layer gradient and an old task's stored one, on whole gradients or on their
    components in the old subspace (``on="projection"``); both are ``out x d`` matrices."""
    if on == "projection":
        grad, old_grad = grad @ basis, old_grad @ basis
    denominator = grad.norm() * old_grad.norm()
    defined = bool(denominator > 0)
    return (float((grad * old_grad).sum() / denominator) if defined else 0.0), defined


def correlation_test(grad: torch.Tensor, basis: torch.Tensor, old_grad: Optional[torch.Tensor], epsilon_1: float,
                     epsilon_2: float = 0.0, on: str = "gradient") -> Correlation:
    """Definitions 1 and 2 for one old task at one layer (see the module docstring). ``grad`` and ``old_grad`` are
    layer gradients (any shape whose first dim is the output dim); ``basis`` is the old task's ``d x r_j`` basis.
    Without ``old_grad`` (TRGP) only Definition 1 is tested: a sufficient projection is regime ``STRONG``."""
    grad = weight_matrix(grad).float()
    basis = basis.to(grad.device)
    grad_norm = float(grad.norm())
    ratio = float((grad @ basis).norm()) / grad_norm if grad_norm > 0 else 0.0
    cosine, defined = 0.0, False
    if old_grad is not None:
        cosine, defined = gradient_cosine(grad, basis, weight_matrix(old_grad).to(grad), on)
    if ratio < epsilon_1:
        regime = REGIME_WEAK
    elif defined and cosine >= epsilon_2:
        regime = REGIME_POSITIVE
    else:
        regime = REGIME_STRONG
    return Correlation(ratio, cosine, regime)


def trust_region(tests: list[Correlation], size: int) -> list[int]:
    """The old tasks in regimes 2/3: the ``size`` with the largest projection among those with sufficient projection
    (TRGP's trust region), in decreasing order of projection."""
    strong = sorted((j for j, t in enumerate(tests) if t.regime != REGIME_WEAK), key=lambda j: -tests[j].projection_ratio)
    return strong[:size]


def assign_regimes(tests: list[Correlation], region: list[int], may_open: bool) -> list[int]:
    """Regime of every old task: 3 for a positively correlated trust-region task where backward transfer may happen
    (``may_open``), 2 for the other trust-region tasks, 1 for the rest."""
    regimes = []
    for j, test in enumerate(tests):
        if j not in region:
            regimes.append(REGIME_WEAK)
        else:
            regimes.append(REGIME_POSITIVE if may_open and test.regime == REGIME_POSITIVE else REGIME_STRONG)
    return regimes


def _orthonormal(columns: torch.Tensor, tolerance: float = 1e-3) -> torch.Tensor:
    """Orthonormal basis of the span of ``columns`` (directions with singular value ≤ tolerance dropped)."""
    if columns.shape[1] == 0:
        return columns
    try:
        u, s, _ = torch.linalg.svd(columns.float(), full_matrices=False)
    except torch.linalg.LinAlgError:
        # LAPACK's divide-and-conquer SVD can fail to converge on many exactly repeated singular values, as when
        # two task bases share union directions (seen on permuted MNIST: 784 x 809); the Gram matrix's
        # eigendecomposition gives the same span and does not fail (float64: its eigenvalues are s squared).
        values, vectors = torch.linalg.eigh(columns.double().T @ columns.double())
        s = values.clamp_min(0).sqrt()
        keep = s > tolerance
        return (columns.double() @ (vectors[:, keep] / s[keep])).float().contiguous()
    return u[:, s > tolerance].float().contiguous()


class LayerProjection:
    """The projection of one layer's gradient during one task: GPM's, with the regime-3 subspaces kept open.

    Only the directions of the regime-3 tasks' span outside every other old task's basis stay open (the gradient
    loses its component in each regime-1/2 task's subspace, Eq. 3): ``open_dims`` is the dimension of that span,
    ``allowed_dims`` what is left of it, the directions the new task may actually move."""

    def __init__(self, memory: LayerMemory, open_tasks=(), backward_scale: float = 1.0):
        self.union = memory.union
        self.backward_scale = backward_scale
        self.open_tasks = sorted(set(open_tasks))
        protected = [memory.task_bases[j] for j in range(len(memory.task_bases)) if j not in self.open_tasks]
        allowed = _orthonormal(torch.cat([memory.task_bases[j] for j in self.open_tasks], 1)) if self.open_tasks else None
        self.open_dims = 0 if allowed is None else allowed.shape[1]
        if allowed is not None and protected:
            shield = _orthonormal(torch.cat(protected, 1), tolerance=1e-6)
            allowed = _orthonormal(allowed - shield @ (shield.T @ allowed))
        self.allowed = allowed if allowed is not None and allowed.shape[1] > 0 else None

    @property
    def allowed_dims(self) -> int:
        return 0 if self.allowed is None else self.allowed.shape[1]

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """Projected copy of ``grad`` (any shape whose first dim is the output dim)."""
        g = weight_matrix(grad)
        union = self.union.to(g.device, g.dtype)
        kept = None
        if self.allowed is not None:
            allowed = self.allowed.to(g.device, g.dtype)
            kept = (g @ allowed) @ allowed.T
        rest = g if kept is None else g - kept
        out = rest - (rest @ union) @ union.T
        if kept is not None:
            out = out + self.backward_scale * kept
        return out.reshape(grad.shape)


class BackwardTransfer:
    """CUBER's regime 3 during one task: which old tasks are open at each layer, the penalty of Eq. 3 and the
    per-step demotion test of Eq. 2.

    Args:
        memory_layers: the layers' :class:`LayerMemory` (bases ``B_j`` and stored gradients ``g_j``).
        open_tasks: ``{layer: [old task, ...]}`` in regime 3 at the start of the task.
        start_weights: ``{layer: W^{t−1}}``, the weights the penalty measures the change from.
        penalty_lambda, epsilon_2, correlation_test: see :class:`~hf_lowrank.cuber.ContinualConfig`.
    """

    def __init__(self, memory_layers: dict[str, LayerMemory], open_tasks: dict[str, list[int]],
                 start_weights: dict[str, torch.Tensor], penalty_lambda: float, epsilon_2: float,
                 correlation_test: str = "gradient"):
        self.memory_layers = memory_layers
        self.open_tasks = {name: sorted(tasks) for name, tasks in open_tasks.items() if tasks}
        self.start_weights = {name: start_weights[name] for name in self.open_tasks}
        self.penalty_lambda = penalty_lambda
        self.epsilon_2 = epsilon_2
        self.correlation_test = correlation_test

    def demote_(self, grads: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
        """Test every open (layer, task) on this step's gradients; close the failing ones and return them."""
        pairs, margins = [], []
        for name, tasks in self.open_tasks.items():
            if name not in grads:  # no gradient reached this layer on this step: nothing to test
                continue
            grad = weight_matrix(grads[name]).float()
            layer = self.memory_layers[name]
            for j in tasks:
                basis = layer.task_bases[j].to(grad.device)
                old = weight_matrix(layer.task_grads[j]).to(grad)
                if self.correlation_test == "projection":
                    g, old = grad @ basis, old @ basis
                else:
                    g = grad
                # cos < epsilon_2 (an undefined cosine fails): <g_j, g> - epsilon_2 ||g_j|| ||g|| < 0 or g = 0
                margin = (g * old).sum() - self.epsilon_2 * g.norm() * old.norm()
                margins.append(torch.where(g.norm() > 0, margin, torch.full_like(margin, -1.0)))
                pairs.append((name, j))
        if not pairs:
            return []
        failing = [pair for pair, margin in zip(pairs, torch.stack(margins).tolist()) if margin < 0]
        for name, j in failing:
            self.open_tasks[name].remove(j)
            if not self.open_tasks[name]:
                del self.open_tasks[name]
                del self.start_weights[name]
        return failing

    def _penalty_terms(self, layers: dict[str, nn.Module]):
        for name, tasks in self.open_tasks.items():
            weight = layers[name].weight
            delta = weight_matrix(weight.detach() - self.start_weights[name].to(weight)).float()
            for j in tasks:
                basis = self.memory_layers[name].task_bases[j].to(delta.device)
                yield name, (delta @ basis) @ basis.T

    @torch.no_grad()
    def add_penalty_grad_(self, layers: dict[str, nn.Module]) -> None:
        """``grad += λ Σ_j ΔP_j / ||ΔP_j||`` on every layer with open tasks (the gradient of Eq. 3's penalty)."""
        if not self.penalty_lambda:
            return
        for name, moved in self._penalty_terms(layers):
            weight = layers[name].weight
            if weight.grad is None:
                continue
            unit = moved / moved.norm().clamp_min(torch.finfo(moved.dtype).tiny)
            weight.grad.add_(unit.reshape(weight.shape).to(weight.grad), alpha=self.penalty_lambda)

    @torch.no_grad()
    def penalty(self, layers: dict[str, nn.Module]) -> torch.Tensor:
        """The penalty term of Eq. 3 at the current weights (a 0-dim tensor, for logging)."""
        terms = [moved.norm() for _, moved in self._penalty_terms(layers)]
        return self.penalty_lambda * torch.stack(terms).sum() if terms else torch.zeros(())


class GradientProjection:
    """Projects the gradients of the target layers in place and zeroes frozen parameters' gradients.

    Call :meth:`project_` between ``backward()`` and ``optimizer.step()``, or :meth:`attach` it to any torch
    optimizer (a step pre-hook; with ``project_update=True`` also a post-hook projecting the actual update, needed
    for Adam-type optimizers and weight decay, whose elementwise scaling leaves the allowed subspace). With a
    :class:`BackwardTransfer` (CUBER), each step first runs the demotion test on the task loss's gradient (if
    ``demote_every_step``), rebuilding the projection of a layer that lost a regime-3 task, then adds the penalty's
    gradient; ``demotions`` records ``(step, layer, old task)``.
    """

    def __init__(self, layers: dict[str, nn.Module], projections: dict[str, LayerProjection],
                 frozen: list[nn.Parameter] = (), project_update: bool = False,
                 backward: "BackwardTransfer | None" = None, demote_every_step: bool = False,
                 backward_scale: float = 1.0):
        self.layers = layers
        self.projections = projections
        self.frozen = list(frozen)
        self.project_update = project_update
        self.backward = backward
        self.demote_every_step = demote_every_step
        self.backward_scale = backward_scale
        self.steps = 0
        self.demotions: list[tuple[int, str, int]] = []
        self._before: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def project_(self) -> None:
        if self.backward is not None:
            if self.demote_every_step:
                grads = {n: m.weight.grad for n, m in self.layers.items() if m.weight.grad is not None}
                failing = self.backward.demote_({n: g for n, g in grads.items() if n in self.backward.open_tasks})
                for name in dict.fromkeys(name for name, _ in failing):
                    self.projections[name] = LayerProjection(
                        self.backward.memory_layers[name], self.backward.open_tasks.get(name, ()), self.backward_scale)
                self.demotions += [(self.steps, name, j) for name, j in failing]
            self.backward.add_penalty_grad_(self.layers)
        for name, module in self.layers.items():
            if module.weight.grad is not None:
                module.weight.grad.copy_(self.projections[name].project(module.weight.grad))
        for param in self.frozen:
            param.grad = None
        self.steps += 1

    def _pre_step(self, optimizer, args, kwargs):
        self.project_()
        if self.project_update:
            self._before = {n: m.weight.detach().clone() for n, m in self.layers.items()}
            self._before_frozen = [p.detach().clone() for p in self.frozen]

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs):
        if not self.project_update:
            return
        for name, module in self.layers.items():
            before = self._before[name]
            # project(-delta) with the descent-direction convention of `project`, then negate back
            module.weight.copy_(before - self.projections[name].project(before - module.weight))
        for param, before in zip(self.frozen, self._before_frozen):
            param.copy_(before)
        self._before, self._before_frozen = {}, []

    def attach(self, optimizer: torch.optim.Optimizer) -> list:
        """Register on ``optimizer``; returns the hook handles (``.remove()`` them to detach)."""
        return [optimizer.register_step_pre_hook(self._pre_step), optimizer.register_step_post_hook(self._post_step)]


SCALE_DAMPING = 1e-4  # δ of the preconditioned scale update, relative to the mean eigenvalue of (W B_j)ᵀ W B_j


def precondition_scale_grad(grad: torch.Tensor, weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(MᵀM + δI)⁻¹ grad`` with ``M = W B_j`` and ``δ`` = :data:`SCALE_DAMPING` x ``tr(MᵀM) / r``."""
    m = weight_matrix(weight.detach()).to(grad) @ basis.to(grad)
    gram = m.T @ m
    eye = torch.eye(gram.shape[0], device=grad.device, dtype=grad.dtype)
    damping = SCALE_DAMPING * gram.diagonal().mean() + torch.finfo(grad.dtype).tiny
    return torch.linalg.solve(gram + damping * eye, grad)


class ScaledWeightProjection:
    """TRGP's scaled weight projection (Lin et al., ICLR 2022), CUBER's forward-transfer part.

    For the old tasks ``j`` in a layer's trust region, the layer computes with
    ``W_eff = W + Σ_j W B_j (Q_j − I) B_jᵀ``: the frozen part ``W B_j`` of old task ``j`` is reused through a small
    learnable ``r_j x r_j`` scale ``Q_j`` (initialised to ``I``, so training starts from ``W``). ``W`` itself stays
    GPM-projected. The scales belong to the new task: they are stored with it and re-applied whenever that task is
    evaluated. Implemented as a forward hook adding ``x ΔWᵀ`` (Linear) or ``conv(x, ΔW)`` (Conv2d) to the output;
    ``W``'s gradient also flows through the scaled term (and is then projected as usual). The scales' own gradient
    ``(W B_j)ᵀ (∂L/∂W_eff) B_j`` is not projected (as in TRGP); :meth:`attach_optimizer` hands them to the
    optimizer. ``preconditioned`` (ours, ``scale_update="preconditioned"``) multiplies that gradient by
    ``(MᵀM + δI)⁻¹`` with ``M = W B_j``: a step then changes ``W_eff`` by ``-lr M (MᵀM + δI)⁻¹ Mᵀ G B_j B_jᵀ``,
    never more than ``lr ‖G‖``, where the plain step can reach ``lr ‖M‖² ‖G‖``.
    """

    def __init__(self, scales: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]], preconditioned: bool = False):
        self.scales = scales  # layer -> {old task: (basis B_j, scale Q_j)}
        self.preconditioned = preconditioned

    @classmethod
    def identity(cls, memory_layers: dict[str, LayerMemory], trust_regions: dict[str, list[int]], device=None,
                 preconditioned: bool = False):
        """Fresh trainable scales ``Q_j = I`` for each layer's trust-region tasks."""
        scales = {}
        for name, tasks in trust_regions.items():
            bases = memory_layers[name].task_bases
            scales[name] = {
                j: (bases[j], torch.eye(bases[j].shape[1], device=device).requires_grad_(True))
                for j in tasks if bases[j].shape[1]
            }
        return cls({n: s for n, s in scales.items() if s}, preconditioned)

    @classmethod
    def from_memory(cls, memory_layers: dict[str, LayerMemory], task_index: int):
        """The scales stored with task ``task_index`` (empty if it used none)."""
        scales = {}
        for name, layer in memory_layers.items():
            stored = layer.task_scales[task_index] if task_index < len(layer.task_scales) else {}
            if stored:
                scales[name] = {j: (layer.task_bases[j], q) for j, q in stored.items()}
        return cls(scales)

    def parameters(self) -> list[torch.Tensor]:
        return [q for layer in self.scales.values() for _, q in layer.values()]

    def zero_grad(self) -> None:
        """Drop the scales' gradients (``Trainer`` only zeroes the model's own parameters)."""
        for q in self.parameters():
            q.grad = None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, lr: float) -> list:
        """Train the scales with ``optimizer`` (their own group: ``lr``, no weight decay) and clear their gradients
        after every step, as ``Trainer`` does for the model's parameters with ``model.zero_grad()``: the scales are
        not model parameters, so without it their gradients would add up over the whole task (an ever-growing
        step, which diverged on permuted MNIST). Returns the hook handle."""
        optimizer.add_param_group({"params": self.parameters(), "weight_decay": 0.0, "lr": lr})
        return optimizer.register_step_post_hook(lambda *_: self.zero_grad())

    def stored(self) -> dict[str, dict[int, torch.Tensor]]:
        """``{layer: {old task: Q}}`` detached, for the memory."""
        return {name: {j: q.detach().clone() for j, (_, q) in layer.items()} for name, layer in self.scales.items()}

    def weight_delta(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        w = weight_matrix(weight)
        delta = torch.zeros_like(w)
        for basis, scale in self.scales[name].values():
            basis, scale = basis.to(w), scale.to(w)
            eye = torch.eye(scale.shape[0], device=w.device, dtype=w.dtype)
            delta = delta + ((w @ basis) @ (scale - eye)) @ basis.T
        return delta.reshape(weight.shape)

    def attach(self, layers: dict[str, nn.Module]) -> list:
        """Register the forward hooks on the layers that have scales (and, when ``preconditioned``, the scales'
        gradient hooks); returns the handles."""
        handles = []
        for name in self.scales:
            module = layers[name]
            if self.preconditioned:
                for basis, scale in self.scales[name].values():
                    handles.append(scale.register_hook(
                        lambda grad, module=module, basis=basis: precondition_scale_grad(grad, module.weight, basis)))

            def hook(module, args, output, name=name):
                delta = self.weight_delta(name, module.weight)
                if isinstance(module, nn.Conv2d):
                    return output + nn.functional.conv2d(args[0], delta, None, module.stride, module.padding,
                                                         module.dilation)
                return output + nn.functional.linear(args[0], delta)

            handles.append(module.register_forward_hook(hook))
        return handles
