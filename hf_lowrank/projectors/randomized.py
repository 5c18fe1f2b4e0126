"""Randomized SVD basis (Halko et al. 2011 via ``torch.svd_lowrank``), as GaLore 2 uses for cheap refreshes.

For a LLaMA-1B MLP matrix (2048 x 5461, rank 512) a refresh is several times cheaper than a full SVD.
"""
import torch

from .svd import SVDProjector


class RandomizedSVDProjector(SVDProjector):
    """Top-r singular vectors estimated with ``torch.svd_lowrank(q=rank+oversample, niter)``.

    The sketch is drawn from a generator seeded with ``seed`` plus the refresh count, so runs are
    reproducible and a resumed run draws the same sketches as an uninterrupted one.
    """

    def __init__(self, shape, rank, proj_type="std", sign_convention="none", oversample: int = 8, niter: int = 2,
                 seed: int = 0):
        super().__init__(shape, rank, proj_type, sign_convention)
        if oversample < 0 or niter < 0:
            raise ValueError(f"`oversample` and `niter` must be >= 0, got {oversample} and {niter}.")
        self.oversample, self.niter, self.seed = oversample, niter, seed
        self._refreshes = 0

    def _singular_vectors(self, grad):
        q = min(self.rank + self.oversample, *grad.shape)
        with torch.random.fork_rng(devices=[grad.device] if grad.device.type == "cuda" else []):
            torch.manual_seed(self.seed + self._refreshes)
            u, _, v = torch.svd_lowrank(grad, q=q, niter=self.niter)
        self._refreshes += 1
        return u[:, : self.rank] if self.side == "left" else v[:, : self.rank]

    def state_dict(self):
        state = super().state_dict()
        if state:
            state["refreshes"] = torch.tensor(self._refreshes, dtype=torch.int64)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._refreshes = int(state["refreshes"]) if "refreshes" in state else 0
