"""Exact truncated SVD basis (GaLore, Zhao et al. 2024, arXiv 2403.03507)."""
import torch

from .base import Projector


class SVDProjector(Projector):
    """Top-r singular vectors of the gradient from ``torch.linalg.svd`` (fp32).

    ``sign_convention``: ``"none"`` reproduces galore-torch bit-for-bit (LAPACK's arbitrary signs);
    ``"align"`` flips each new vector to agree with the previous basis (or, on the first fit, to make its
    largest-magnitude entry positive), so identical gradients give identical bases on every process and
    kept moments stay meaningful across refreshes.
    """

    def __init__(self, shape, rank, proj_type="std", sign_convention: str = "none"):
        super().__init__(shape, rank, proj_type)
        if sign_convention not in ("none", "align"):
            raise ValueError(f"`sign_convention`={sign_convention!r}: use 'none' (galore-torch) or 'align'.")
        self.sign_convention = sign_convention
        self._q: torch.Tensor | None = None

    def _singular_vectors(self, grad: torch.Tensor) -> torch.Tensor:
        """Leading singular vectors of the projected side, as columns (``dim x rank``)."""
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return u[:, : self.rank] if self.side == "left" else vh[: self.rank].T

    def _fit(self, grad: torch.Tensor) -> None:
        self._q = self._fix_signs(self._singular_vectors(grad).contiguous()).to(self.storage_dtype)

    def _fix_signs(self, q: torch.Tensor) -> torch.Tensor:
        if self.sign_convention == "none":
            return q
        if self._q is not None and self._q.shape == q.shape:
            ref = (q * self._q.to(q.device, q.dtype)).sum(0)
        else:
            ref = q.gather(0, q.abs().argmax(0, keepdim=True)).squeeze(0)
        return q * torch.where(ref < 0, -1.0, 1.0).to(q.dtype)

    def basis(self) -> torch.Tensor:
        if self._q is None:
            raise RuntimeError(f"{type(self).__name__}.basis() called before update().")
        return self._q

    def state_dict(self):
        return {} if self._q is None else {"basis": self._q}

    def load_state_dict(self, state):
        self._q = state["basis"] if "basis" in state else None
