"""DCT-II column selection: an SVD-free basis (Modoranu et al., arXiv 2505.17967).

The orthonormal DCT-II matrix of each size is computed once and shared by every layer; a layer stores only
the ``rank`` indices of its selected DCT vectors (int32), so projector state is ~``dim/rank * 4``x smaller than
an SVD basis. Selection keeps the DCT vectors that carry the most gradient mass.
"""
import math

import torch

from .base import Projector


_DCT_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def dct_matrix(size: int, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` (``C @ x`` = ``scipy.fft.dct(x, norm="ortho")``), cached per size/device."""
    key = (size, str(torch.device(device) if device is not None else torch.device("cpu")))
    if key not in _DCT_CACHE:
        n = torch.arange(size, dtype=torch.float64, device=device)
        c = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size)) * math.sqrt(2.0 / size)
        c[0] /= math.sqrt(2.0)
        _DCT_CACHE[key] = c.float()
    return _DCT_CACHE[key]


class DCTProjector(Projector):
    """Basis = the ``rank`` DCT-II vectors with the largest ``norm`` of gradient coefficients."""

    def __init__(self, shape, rank, proj_type="std", norm: str = "l1"):
        super().__init__(shape, rank, proj_type)
        if norm not in ("l1", "l2"):
            raise ValueError(f"`norm`={norm!r}: DCT column selection supports 'l1' or 'l2'.")
        self.norm = norm
        self._indices: torch.Tensor | None = None
        self._device = None

    def _fit(self, grad):
        dct_basis = dct_matrix(self.dim, grad.device).T  # column k = k-th DCT vector
        coeffs = dct_basis.T @ grad if self.side == "left" else grad @ dct_basis
        along = 1 if self.side == "left" else 0  # reduce over the non-projected dimension
        scores = coeffs.abs().sum(along) if self.norm == "l1" else coeffs.square().sum(along)
        self._indices = scores.topk(self.rank).indices.sort().values.to(torch.int32)
        self._device = grad.device

    def basis(self):
        if self._indices is None:
            raise RuntimeError("DCTProjector.basis() called before update().")
        return dct_matrix(self.dim, self._indices.device).T.index_select(1, self._indices.long())

    def state_dict(self):
        return {} if self._indices is None else {"indices": self._indices}

    def load_state_dict(self, state):
        self._indices = state["indices"].to(torch.int32) if "indices" in state else None
