"""Warm-started subspace iteration: a refresh that starts from the previous basis instead of a full SVD.

The first fit is an exact SVD. Every later refresh runs ``iterations`` block power iterations of ``G Gᵀ`` (left
side; ``Gᵀ G`` for the right side) from the previous basis, orthonormalises with QR (``Y = Q R``), and orders the
directions by the SVD of the small ``r x r`` factor ``R``, so the columns approximate the leading singular vectors
in order. The cost is ``2·iterations`` products with ``G`` plus O(dim·r²) instead of a full SVD's
O(m·n·min(m, n)); the previous basis is the only state, so a resumed run refreshes exactly as an uninterrupted one.
"""
import torch

from .svd import SVDProjector


class SubspaceIterationProjector(SVDProjector):
    """Top-r singular subspace tracked by warm-started block power iteration (exact SVD on the first refresh)."""

    def __init__(self, shape, rank, proj_type="std", sign_convention: str = "none", iterations: int = 1):
        super().__init__(shape, rank, proj_type, sign_convention)
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise ValueError(f"`iterations` must be an int >= 1 (power iterations per refresh), got {iterations!r}.")
        self.iterations = iterations

    def _singular_vectors(self, grad: torch.Tensor) -> torch.Tensor:
        if self._q is None:
            return super()._singular_vectors(grad)
        rows = grad if self.side == "left" else grad.T  # the projected dimension along the rows
        q = self._q.to(grad.device, grad.dtype)
        for _ in range(self.iterations):
            q, triangle = torch.linalg.qr(rows @ (rows.T @ q))
        # Y = Q R spans the new subspace; the SVD of the small R orders its directions by how strongly G Gᵀ
        # stretches them (no further product with G).
        order, _, _ = torch.linalg.svd(triangle)
        return q @ order
