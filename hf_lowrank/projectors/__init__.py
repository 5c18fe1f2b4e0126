"""Subspace bases for low-rank gradient projection. One basis per file; tensor-only state."""
from .base import PROJ_TYPES, Projector, resolve_side
from .svd import SVDProjector


__all__ = ["PROJ_TYPES", "Projector", "SVDProjector", "resolve_side"]
