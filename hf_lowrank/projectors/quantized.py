"""Low-bit storage for projector bases (Q-GaLore, Zhang et al. 2024, arXiv 2407.08296: INT4 projectors).

``QuantizedProjector`` wraps an SVD-type projector and keeps its basis only as asymmetric group-quantized
integers (``8 // bits`` codes per byte: two at 4 bits, unlike Q-GaLore's one code per uint8) plus a per-group
scale and offset (``hf_lowrank.utils.quantization``).
"""
import torch

from ..utils.quantization import check_bits, dequantize_groups, quantize_groups
from .base import Projector
from .svd import SVDProjector


_CODEC_KEYS = ("codes", "scale", "minimum")


class QuantizedProjector(Projector):
    """Stores ``inner``'s basis in ``bits``-bit groups of ``group_size`` values; dequantises on use."""

    def __init__(self, inner: SVDProjector, bits: int = 4, group_size: int = 256):
        if not isinstance(inner, SVDProjector):
            raise TypeError(
                f"QuantizedProjector stores dense bases (svd/randomized); {type(inner).__name__} already stores "
                "indices or a seed, so there is nothing to quantise."
            )
        check_bits(bits, "quant_bits")
        if group_size < 1:
            raise ValueError(f"`group_size` must be >= 1, got {group_size}.")
        self.inner, self.bits, self.group_size = inner, bits, group_size
        self.data_dependent = inner.data_dependent
        self.shape, self.side, self.dim, self.rank = inner.shape, inner.side, inner.dim, inner.rank
        self._state: dict[str, torch.Tensor] = {}

    def _fit(self, grad):
        extra = self._inner_extra()
        if self._state:  # let sign alignment see the previous (dequantised) basis
            self.inner.load_state_dict({"basis": self.basis(), **extra})
        self.inner._fit(grad)
        q = self.inner.basis()
        codes, scale, minimum = quantize_groups(q, self.bits, self.group_size)
        # the inner projector's own counters (e.g. the randomized sketch's refresh count) are kept and saved too
        extra = {k: v for k, v in self.inner.state_dict().items() if k != "basis"}
        self._state = {"codes": codes, "scale": scale, "minimum": minimum, **extra}
        self.inner.load_state_dict(extra)  # the dense copy is not kept

    def _inner_extra(self) -> dict:
        return {k: v for k, v in self._state.items() if k not in _CODEC_KEYS}

    def basis(self):
        if not self._state:
            raise RuntimeError("QuantizedProjector.basis() called before update().")
        # Dequantised on every use and never cached, so the dense basis is transient (Q-GaLore's memory claim).
        s = self._state
        return dequantize_groups(s["codes"], s["scale"], s["minimum"], self.bits, self.group_size, (self.dim, self.rank))

    def state_dict(self):
        return dict(self._state)

    def load_state_dict(self, state):
        self._state = dict(state)
        self.inner.load_state_dict(self._inner_extra())
