"""Per-layer memory of old tasks' input subspaces (GPM, Saha et al. 2021), with tensor-only state.

Representations (what a layer multiplies its weight with) are accumulated as the covariance ``Rᵀ R`` (``d x d``)
from forward hooks, so no example is ever stored; its eigenvectors/eigenvalues are the left singular vectors and
squared singular values of GPM's representation matrix ``R`` (``d x n``). Supported layers:

- ``nn.Linear``: the input rows; every leading dimension (batch, tokens) is a row, so a transformer's linear layers
  use one row per token;
- ``nn.Conv2d`` (``groups=1``, zero padding): the im2col patches (``C_in·kh·kw`` per output position), as in GPM.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.targets import find_target_linears


SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


def _check_projectable(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                f"Layer {name!r} is an nn.Conv2d with groups={module.groups}, padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r}; only groups=1 with numeric zero padding can be projected. "
                "Leave it out of `target_modules`."
            )
    elif not isinstance(module, nn.Linear):
        raise ValueError(
            f"Layer {name!r} ({type(module).__name__}) cannot be projected: only nn.Linear and nn.Conv2d are supported. "
            "Leave it out of `target_modules`."
        )


def find_projectable_layers(model: nn.Module, target_modules, exclude=None) -> list[tuple[str, nn.Module]]:
    """Target layers in model order (the library's one matcher, ``utils.targets``); an entry that matches only
    unsupported modules, or a Conv2d that cannot be projected, raises ValueError. ``"all-linear"`` is the linear
    layers (a convolution is targeted by name)."""
    types = (nn.Linear,) if target_modules == "all-linear" else SUPPORTED_TYPES
    layers = find_target_linears(model, target_modules, module_types=types, exclude=exclude, unsupported="raise")
    for name, module in layers:
        _check_projectable(name, module)
    return layers


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The representation rows (``n x d``) a layer's weight sees for input ``x``."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def weight_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A weight (or its gradient) as the ``out x d`` matrix that multiplies the representation."""
    return tensor.reshape(tensor.shape[0], -1)


class RepresentationRecorder:
    """Context manager accumulating ``Rᵀ R`` (float32, on the layer's device) of each layer's inputs over the forward
    passes inside it."""

    def __init__(self, layers: list[tuple[str, nn.Module]]):
        self.layers = layers
        self.covariances: dict[str, torch.Tensor] = {}
        self._handles = []

    def _hook(self, name):
        def record(module, args, _output):
            rows = layer_input_rows(module, args[0].detach()).float()
            cov = rows.T @ rows
            self.covariances[name] = cov if name not in self.covariances else self.covariances[name] + cov
        return record

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _spectrum(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix."""
    values, vectors = torch.linalg.eigh(cov)
    return values.flip(0).clamp_min(0), vectors.flip(1)


def energy_rank(energies: torch.Tensor, threshold: float, total: float, captured: float = 0.0) -> int:
    """Smallest ``r`` with ``captured + Σ_{i≤r} energies_i ≥ threshold · total`` (GPM Eq. 5/9); 0 if already met.

    GPM's code counts the directions strictly *below* the threshold (one fewer at the boundary); we follow the
    paper's criterion, the smallest basis that reaches the threshold.
    """
    if total <= 0 or captured >= threshold * total:
        return 0
    cumulative = captured + torch.cumsum(energies, 0)
    reached = torch.nonzero(cumulative >= threshold * total * (1 - 1e-12))
    return int(reached[0]) + 1 if len(reached) else len(energies)


def basis_from_covariance(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Orthonormal basis (``d x r``, float32) of the top directions explaining ``threshold`` of the energy."""
    values, vectors = _spectrum(cov)
    rank = energy_rank(values, threshold, float(values.sum()))
    return vectors[:, :rank].float().contiguous()


def extend_basis(basis: torch.Tensor, cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """GPM's incremental update: add only directions outside ``basis`` until ``threshold`` of the energy is explained."""
    if basis.shape[1] == 0:
        return basis_from_covariance(cov, threshold)
    total = float(torch.trace(cov))
    m = basis.to(cov.dtype)
    captured = float(torch.trace(m.T @ cov @ m))
    residual = cov - m @ (m.T @ cov)
    residual = residual - (residual @ m) @ m.T
    values, vectors = _spectrum((residual + residual.T) / 2)
    rank = min(energy_rank(values, threshold, total, captured), cov.shape[0] - basis.shape[1])
    return torch.cat([basis, vectors[:, :rank].float()], dim=1).contiguous()


def task_basis_from_union(union: torch.Tensor, cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """A finished task's own basis ``B_j``, chosen among the columns of the (already extended) union basis by the
    energy criterion on the task's covariance (TRGP/CUBER: "chosen from O and the new singular vectors"): the
    fewest columns, by decreasing task energy ``uᵀ C u``, explaining ``threshold`` of the task's energy. So ``B_j``
    lies inside the protected union, and ``W B_j`` (what TRGP's scales multiply) does not move while ``j`` is
    protected."""
    if union.shape[1] == 0:
        return union
    m = union.to(cov.dtype)
    energies = ((m.T @ cov) * m.T).sum(1)
    order = torch.argsort(energies, descending=True)
    rank = energy_rank(energies[order], threshold, float(torch.trace(cov))) or 1
    return union[:, order[:rank].sort().values].float().contiguous()


@dataclass
class LayerMemory:
    """What one layer remembers: the union basis ``M`` of all old tasks (GPM); for TRGP and CUBER each old task's own
    basis ``B_j`` and the TRGP scales it learnt; for CUBER also its layer gradient ``g_j`` (``out x d``) at the end
    of its training, which the correlation test (Definition 2) compares whole."""

    union: torch.Tensor
    task_bases: list = field(default_factory=list)
    task_grads: list = field(default_factory=list)
    task_scales: list = field(default_factory=list)  # per task: {old task j: TRGP scale Q_j} (forward transfer)

    def tensors(self) -> dict[str, torch.Tensor]:
        state = {"union": self.union}
        for j, basis in enumerate(self.task_bases):
            state[f"task{j}.basis"] = basis
        for j, grad in enumerate(self.task_grads):
            state[f"task{j}.grad"] = grad
        for t, scales in enumerate(self.task_scales):
            for j, scale in scales.items():
                state[f"task{t}.scale{j}"] = scale
        return state

    def nbytes(self) -> dict[str, int]:
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        scales = [q for per_task in self.task_scales for q in per_task.values()]
        return {"union": size([self.union]), "task_bases": size(self.task_bases), "task_grads": size(self.task_grads),
                "task_scales": size(scales)}


class SubspaceMemory:
    """Bases of every target layer; grows after each task. State is tensors only (``torch.load(weights_only=True)``)."""

    def __init__(self, layer_dims: dict[str, int], keep_task_bases: bool, keep_task_grads: bool = False):
        if keep_task_grads and not keep_task_bases:
            raise ValueError("Stored task gradients need the task bases (keep_task_bases=True).")
        self.keep_task_bases = keep_task_bases
        self.keep_task_grads = keep_task_grads
        self.layers = {name: LayerMemory(union=torch.zeros(dim, 0)) for name, dim in layer_dims.items()}
        self.num_tasks = 0

    def add_task(self, covariances: dict[str, torch.Tensor], thresholds: dict[str, float],
                 grads: dict[str, torch.Tensor] | None = None, scales: dict[str, dict] | None = None) -> None:
        """Fold one finished task in: extend each union basis; with task bases keep ``B_j`` and the task's TRGP scales
        ``{old task: Q}`` (if it learnt any); with task gradients also ``g_j``."""
        missing = set(self.layers) - set(covariances)
        if missing:
            raise RuntimeError(f"No representation was recorded for layers {sorted(missing)}: were they used in forward?")
        for name, layer in self.layers.items():
            cov = covariances[name]
            layer.union = extend_basis(layer.union, cov, thresholds[name])
            if self.keep_task_bases:
                layer.task_bases.append(task_basis_from_union(layer.union, cov, thresholds[name]))
                layer.task_scales.append(dict((scales or {}).get(name, {})))
            if self.keep_task_grads:
                layer.task_grads.append(weight_matrix(grads[name]).float().clone())
        self.num_tasks += 1

    def nbytes(self) -> dict[str, dict[str, int]]:
        return {name: layer.nbytes() for name, layer in self.layers.items()}

    def total_bytes(self) -> int:
        return sum(sum(parts.values()) for parts in self.nbytes().values())

    def ranks(self) -> dict[str, tuple[int, int]]:
        """``{layer: (basis size, input dimension)}``, GPM's 'gradient constraints summary'."""
        return {name: (layer.union.shape[1], layer.union.shape[0]) for name, layer in self.layers.items()}

    def state_dict(self) -> dict:
        state = {"num_tasks": self.num_tasks}
        for name, layer in self.layers.items():
            for key, tensor in layer.tensors().items():
                state[f"{name}/{key}"] = tensor
        return state

    def load_state_dict(self, state: dict) -> None:
        self.num_tasks = int(state["num_tasks"])
        for name, layer in self.layers.items():
            if f"{name}/union" not in state:
                raise KeyError(f"Continual state has no basis for layer {name!r}: was it saved from the same model?")
            layer.union = state[f"{name}/union"].float()
            count = self.num_tasks if self.keep_task_bases else 0
            layer.task_bases = [state[f"{name}/task{j}.basis"].float() for j in range(count)]
            layer.task_grads = [state[f"{name}/task{j}.grad"].float()
                                for j in range(self.num_tasks if self.keep_task_grads else 0)]
            for grad in layer.task_grads:
                if grad.shape[1] != layer.union.shape[0]:
                    raise ValueError(
                        f"Continual state of layer {name!r} stores a task gradient of shape {tuple(grad.shape)}, not "
                        f"a layer gradient (out x {layer.union.shape[0]}): it was written by an older version that "
                        "stored g_j B_j. Retrain the sequence (the whole gradient cannot be recovered).")
            layer.task_scales = [
                {j: state[f"{name}/task{t}.scale{j}"].float() for j in range(t) if f"{name}/task{t}.scale{j}" in state}
                for t in range(count)
            ]
