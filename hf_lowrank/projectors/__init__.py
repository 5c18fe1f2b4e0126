"""Subspace bases for low-rank gradient projection. One basis per file; tensor-only state.

``get_projector(name, shape, rank, proj_type, **options)`` builds one from the registry below; optimizers
and tuners refer to projectors by these names only.
"""
import inspect

from .base import PROJ_TYPES, Projector, resolve_side
from .dct import DCTProjector, dct_matrix
from .quantized import QuantizedProjector
from .random import RandomProjector
from .randomized import RandomizedSVDProjector
from .subspace import SubspaceIterationProjector
from .svd import SVDProjector


PROJECTORS: dict[str, type[Projector]] = {
    "svd": SVDProjector,
    "randomized": RandomizedSVDProjector,
    "dct": DCTProjector,
    "random": RandomProjector,
    "subspace": SubspaceIterationProjector,
}


STORAGE_OPTIONS = ("quant_bits", "quant_group_size")


def projector_option_names(name: str) -> list[str]:
    """Options accepted by projector ``name``: its constructor keywords plus the storage quantization options."""
    return sorted(list(inspect.signature(PROJECTORS[name].__init__).parameters)[4:] + list(STORAGE_OPTIONS))


def get_projector(name: str, shape, rank: int, proj_type: str = "std", quant_bits: int | None = None,
                  quant_group_size: int = 256, **options) -> Projector:
    """Build a projector by registry name; ``quant_bits`` (e.g. 4) stores an SVD-type basis quantised."""
    if name not in PROJECTORS:
        raise ValueError(f"Unknown projector {name!r}; available: {sorted(PROJECTORS)}.")
    cls = PROJECTORS[name]
    unknown = sorted(set(options) - set(projector_option_names(name)))
    if unknown:
        raise TypeError(f"Projector {name!r} does not take option(s) {unknown}; it accepts "
                        f"{projector_option_names(name)}.")
    projector = cls(shape, rank, proj_type, **options)
    if quant_bits is not None:
        projector = QuantizedProjector(projector, bits=quant_bits, group_size=quant_group_size)
    return projector


__all__ = [
    "PROJECTORS", "PROJ_TYPES", "DCTProjector", "Projector", "QuantizedProjector", "RandomProjector",
    "RandomizedSVDProjector", "SVDProjector", "SubspaceIterationProjector", "dct_matrix", "get_projector",
    "projector_option_names", "resolve_side",
]
