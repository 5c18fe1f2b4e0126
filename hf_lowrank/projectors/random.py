"""Seeded random orthonormal basis (as APOLLO's random projection, orthonormalised so projection is exact
within the subspace). Only the seed's draw counter and the generator's device type are stored: the basis is
regenerated from them after a reload."""
import torch

from .base import Projector


# Device types whose generator may draw a basis; the state saves the index of the one that did.
GENERATOR_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")
_GENERATORS: dict[torch.device, torch.Generator] = {}  # one per device, re-seeded before every draw


def _generator(device: torch.device) -> torch.Generator:
    if device not in _GENERATORS:
        _GENERATORS[device] = torch.Generator(device=device)
    return _GENERATORS[device]


class RandomProjector(Projector):
    """Orthonormalised Gaussian basis; each refresh draws a new one from ``seed + refresh count``.

    The gradient is not looked at (data-independent subspace). The Gaussian is drawn and orthonormalised on the
    gradient's device, with that device's generator (no host draw, no host-to-device copy). The generator's device
    type is fixed by the first draw and kept for the whole run, resumes included: a CUDA generator's numbers differ
    from the CPU's, so a run resumed on another device type draws on the recorded type and reproduces the same
    bases. The dense basis is kept in memory while training, but never saved: checkpoints carry two int64.
    """

    data_dependent = False

    def __init__(self, shape, rank, proj_type="std", seed: int = 0):
        super().__init__(shape, rank, proj_type)
        self.seed = seed
        self._draw: int | None = None
        self._generator_type: str | None = None
        self._q: torch.Tensor | None = None

    def _generate(self, draw: int, device) -> torch.Tensor:
        device = torch.device(device)
        if device.type == "meta":  # sizing state only: no need to draw
            return torch.empty(self.dim, self.rank, device="meta")
        if self._generator_type is None:
            if device.type not in GENERATOR_DEVICE_TYPES:
                raise ValueError(f"The random projector draws with the generator of the gradient's device, and "
                                 f"device type {device.type!r} has none here; train on one of "
                                 f"{list(GENERATOR_DEVICE_TYPES)} or use another projector (e.g. 'svd').")
            self._generator_type = device.type
        draw_on = device if device.type == self._generator_type else torch.device(self._generator_type)
        generator = _generator(draw_on).manual_seed(self.seed * 1_000_003 + draw)
        gaussian = torch.randn(self.dim, self.rank, generator=generator, device=draw_on, dtype=torch.float32)
        return torch.linalg.qr(gaussian.to(device)).Q

    def _fit(self, grad):
        self._draw = 0 if self._draw is None else self._draw + 1
        self._q = self._generate(self._draw, grad.device)

    def basis(self):
        if self._draw is None:
            raise RuntimeError("RandomProjector.basis() called before update().")
        return self._q

    def state_dict(self):
        if self._draw is None:
            return {}
        kind = GENERATOR_DEVICE_TYPES.index(self._generator_type) if self._generator_type else -1  # -1: meta
        return {"draw": torch.tensor(self._draw, dtype=torch.int64),
                "generator_device": torch.tensor(kind, dtype=torch.int64)}

    def load_state_dict(self, state):
        if "draw" not in state:
            self._draw, self._generator_type, self._q = None, None, None
            return
        kind = int(state.get("generator_device", 0))  # checkpoints without the key were drawn on CPU
        self._generator_type = GENERATOR_DEVICE_TYPES[kind] if kind >= 0 else None
        if self._generator_type not in (None, "cpu") and not getattr(torch, self._generator_type).is_available():
            raise RuntimeError(
                f"This run's random projector bases were drawn with a {self._generator_type} generator, whose numbers "
                f"differ from other devices'; no {self._generator_type} device is available here to draw them again. "
                f"Resume where {self._generator_type} is available (the state can then live on any device).")
        self._draw = int(state["draw"])
        self._q = self._generate(self._draw, state["draw"].device)
