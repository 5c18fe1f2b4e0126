"""The projector contract: a rank-r subspace for one 2-D gradient, with tensor-only state.

A projector holds an orthonormal basis ``Q`` (``dim x r``) of one side of an ``m x n`` matrix:

- side ``"left"``  (``Q`` is ``m x r``): ``project(G) = Qᵀ G`` (``r x n``), ``project_back(R) = Q R``
- side ``"right"`` (``Q`` is ``n x r``): ``project(G) = G Q`` (``m x r``), ``project_back(R) = R Qᵀ``

The side is decided once from the *matrix* shape and ``proj_type`` (never from the low-rank tensor's
shape, which is what breaks galore-torch's square ``reverse_std`` case). Subclasses only say how the basis
is chosen (:meth:`_fit`) and how it is stored (:meth:`basis`, :meth:`state_dict`). Projectors know nothing
about optimizers: the optimizer stores ``state_dict()`` (tensors only) and calls ``load_state_dict``.
"""
from abc import ABC, abstractmethod

import torch


PROJ_TYPES = ("std", "reverse_std", "left", "right")


def resolve_side(shape: tuple[int, int], proj_type: str) -> str:
    """GaLore's side rule. ``std`` projects the smaller dimension (left for wide, right for tall/square)."""
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"`proj_type`={proj_type!r} is not supported; use one of {list(PROJ_TYPES)}.")
    m, n = shape
    if proj_type in ("left", "right"):
        return proj_type
    tall_or_square = m >= n
    if proj_type == "std":
        return "right" if tall_or_square else "left"
    return "left" if tall_or_square else "right"


class Projector(ABC):
    """Base class. ``shape`` is the parameter's ``(m, n)``; ``rank`` is clamped to the projected dimension.

    ``data_dependent``: whether the basis is computed from the gradient (False for a seeded random basis, which
    every process can draw by itself).
    """

    data_dependent: bool = True

    def __init__(self, shape: tuple[int, int], rank: int, proj_type: str = "std"):
        if len(shape) != 2:
            raise ValueError(f"Projectors act on 2-D matrices; got a parameter of shape {tuple(shape)}.")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"`rank` must be a positive int, got {rank!r}.")
        self.shape = (int(shape[0]), int(shape[1]))
        self.side = resolve_side(self.shape, proj_type)
        self.dim = self.shape[0] if self.side == "left" else self.shape[1]
        self.rank = min(rank, self.dim)
        self.storage_dtype = torch.float32  # dense bases are kept in the gradient's dtype, as galore-torch does

    # --- how the basis is chosen and stored: the subclass's job -------------------------------------
    @abstractmethod
    def _fit(self, grad: torch.Tensor) -> None:
        """Choose a new basis from ``grad`` (fp32, ``m x n``) and store it."""

    @abstractmethod
    def basis(self) -> torch.Tensor:
        """The current orthonormal basis ``Q`` (``dim x rank``), in ``storage_dtype`` for dense bases."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensor-only state (what must survive a checkpoint)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`; tensors may come from another device."""

    @property
    def initialized(self) -> bool:
        return bool(self.state_dict())

    # --- shared behaviour ----------------------------------------------------------------------------
    def update(self, grad: torch.Tensor) -> None:
        """Refresh the subspace from the current gradient."""
        if grad.shape != torch.Size(self.shape):
            raise ValueError(f"Projector built for shape {self.shape} got a gradient of shape {tuple(grad.shape)}.")
        self.storage_dtype = grad.dtype if grad.dtype.is_floating_point else torch.float32
        self._fit(grad.detach().float())

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        q = self.basis().to(grad.dtype)
        return q.T @ grad if self.side == "left" else grad @ q

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        q = self.basis().to(low.dtype)
        return q @ low if self.side == "left" else low @ q.T

    def rotation_from(self, previous_basis: torch.Tensor) -> torch.Tensor:
        """``Qᵀ Q_prev`` (``r x r_prev``): re-expresses coordinates of the old subspace in the new one."""
        current = self.basis().float()
        return current.T @ previous_basis.to(current.device, torch.float32)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, rank={self.rank}, side={self.side!r})"
