"""Seeded random orthonormal basis (as APOLLO's random projection, orthonormalised so projection is exact
within the subspace). Only the seed is stored: the basis is regenerated from it after a reload."""
import torch

from .base import Projector


class RandomProjector(Projector):
    """Orthonormalised Gaussian basis; each refresh draws a new one from ``seed + refresh count``.

    The gradient is not looked at (data-independent subspace). The dense basis is kept in memory while
    training for speed, but never saved: checkpoints carry one int64.
    """

    data_dependent = False

    def __init__(self, shape, rank, proj_type="std", seed: int = 0):
        super().__init__(shape, rank, proj_type)
        self.seed = seed
        self._draw: int | None = None
        self._q: torch.Tensor | None = None

    def _generate(self, draw: int, device) -> torch.Tensor:
        if torch.device(device).type == "meta":  # sizing state only: no need to draw
            return torch.empty(self.dim, self.rank, device="meta")
        # Drawn on CPU (the same numbers whichever device resumes the run), orthonormalised on the device (the QR
        # is the costly part).
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + draw)
        gaussian = torch.randn(self.dim, self.rank, generator=gen, dtype=torch.float32)
        return torch.linalg.qr(gaussian.to(device)).Q

    def _fit(self, grad):
        self._draw = 0 if self._draw is None else self._draw + 1
        self._q = self._generate(self._draw, grad.device)

    def basis(self):
        if self._draw is None:
            raise RuntimeError("RandomProjector.basis() called before update().")
        return self._q

    def state_dict(self):
        return {} if self._draw is None else {"draw": torch.tensor(self._draw, dtype=torch.int64)}

    def load_state_dict(self, state):
        if "draw" in state:
            self._draw = int(state["draw"])
            self._q = self._generate(self._draw, state["draw"].device)
        else:
            self._draw, self._q = None, None
