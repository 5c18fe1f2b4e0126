"""Low-bit storage for projector bases (Q-GaLore, Zhang et al. 2024, arXiv 2407.08296: INT4 projectors).

``QuantizedProjector`` wraps an SVD-type projector and keeps its basis only as asymmetric group-quantized
integers (two 4-bit codes per byte, unlike Q-GaLore's one code per uint8) plus a per-group scale and offset.
"""
import torch

from .base import Projector
from .svd import SVDProjector


def quantize_groups(x: torch.Tensor, bits: int, group_size: int):
    """Asymmetric per-group uniform quantisation. Returns (codes uint8, scale, minimum); codes are packed
    two per byte when ``bits <= 4``."""
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % group_size
    groups = torch.nn.functional.pad(flat, (0, pad)).view(-1, group_size)
    lo, hi = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((groups - lo) / scale).round_().clamp_(0, levels).to(torch.uint8).view(-1)
    if bits <= 4:
        codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2))
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes, scale.squeeze(1), lo.squeeze(1)


def dequantize_groups(codes, scale, minimum, bits: int, group_size: int, shape) -> torch.Tensor:
    if bits <= 4:
        codes = torch.stack((codes & 0x0F, codes >> 4), dim=1).view(-1)
    numel = int(torch.Size(shape).numel())
    groups = codes[: scale.numel() * group_size].view(-1, group_size).float()
    return (groups * scale[:, None] + minimum[:, None]).view(-1)[:numel].view(shape)


class QuantizedProjector(Projector):
    """Stores ``inner``'s basis in ``bits``-bit groups of ``group_size`` values; dequantises on use."""

    def __init__(self, inner: SVDProjector, bits: int = 4, group_size: int = 256):
        if not isinstance(inner, SVDProjector):
            raise TypeError(
                f"QuantizedProjector stores dense bases (svd/randomized); {type(inner).__name__} already stores "
                "indices or a seed, so there is nothing to quantise."
            )
        if bits not in (2, 4, 8):
            raise ValueError(f"`bits`={bits}: projector quantisation supports 2, 4 or 8 bits.")
        if group_size < 1:
            raise ValueError(f"`group_size` must be >= 1, got {group_size}.")
        self.inner, self.bits, self.group_size = inner, bits, group_size
        self.data_dependent = inner.data_dependent
        self.shape, self.side, self.dim, self.rank = inner.shape, inner.side, inner.dim, inner.rank
        self._state: dict[str, torch.Tensor] = {}

    def _fit(self, grad):
        if self._state:  # let sign alignment see the previous (dequantised) basis
            self.inner.load_state_dict({"basis": self.basis()})
        self.inner._fit(grad)
        q = self.inner.basis()
        codes, scale, minimum = quantize_groups(q, self.bits, self.group_size)
        self._state = {"codes": codes, "scale": scale, "minimum": minimum}
        self.inner.load_state_dict({})  # the dense copy is not kept

    def basis(self):
        if not self._state:
            raise RuntimeError("QuantizedProjector.basis() called before update().")
        # Dequantised on every use and never cached, so the dense basis is transient (Q-GaLore's memory claim).
        s = self._state
        return dequantize_groups(s["codes"], s["scale"], s["minimum"], self.bits, self.group_size, (self.dim, self.rank))

    def state_dict(self):
        return dict(self._state)

    def load_state_dict(self, state):
        self._state = {k: state[k] for k in ("codes", "scale", "minimum") if k in state}
