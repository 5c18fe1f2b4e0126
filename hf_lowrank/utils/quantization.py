"""Asymmetric group quantisation, shared by INT4 projector storage and Q-GaLore's INT8 weights.

A tensor is cut, in row-major order, into groups of ``group_size`` values; each group keeps a float32 ``scale``
and ``minimum`` (its zero point, stored as the group minimum so the smallest value is exact) and ``bits``-bit
codes, ``code = (x - minimum) / scale`` rounded to nearest or stochastically (``E[dequantize] = x``). Codes are
packed ``8 // bits`` per byte for every supported width.
"""
import torch


SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits, parameter: str, supported=SUPPORTED_BITS) -> None:
    if bits not in supported or isinstance(bits, bool):
        raise ValueError(f"`{parameter}`={bits!r} is not supported; use one of {list(supported)}.")


def packed_bytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes the codes of ``numel`` values take (groups padded to ``group_size``, ``8 // bits`` codes a byte)."""
    padded = -(-numel // group_size) * group_size
    return -(-padded // (8 // bits))


def quantize_groups(x: torch.Tensor, bits: int, group_size: int, generator: torch.Generator | None = None,
                    stochastic: bool = False):
    """``(codes uint8 packed, scale, minimum)`` of ``x``. ``stochastic=True`` rounds up with probability equal to
    the fractional part (unbiased), drawing from ``generator`` (a generator on ``x``'s device, or None)."""
    check_bits(bits, "bits")
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % group_size
    groups = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, group_size)
    lo, hi = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (groups - lo).div_(scale)
    if stochastic:
        codes.add_(torch.rand(codes.shape, generator=generator, device=codes.device)).floor_()
    else:
        codes.round_()
    codes = codes.clamp_(0, levels).to(torch.uint8).view(-1)
    return _pack(codes, bits), scale.squeeze(1), lo.squeeze(1)


def dequantize_groups(codes, scale, minimum, bits: int, group_size: int, shape,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    groups = _unpack(codes, bits)[: scale.numel() * group_size].view(-1, group_size).float()
    numel = int(torch.Size(shape).numel())
    return groups.mul_(scale[:, None]).add_(minimum[:, None]).view(-1)[:numel].view(shape).to(dtype)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % per_byte)).view(-1, per_byte)
    packed = codes[:, 0].clone()
    for j in range(1, per_byte):
        packed |= codes[:, j] << (bits * j)
    return packed


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & (2**bits - 1)).view(-1)
