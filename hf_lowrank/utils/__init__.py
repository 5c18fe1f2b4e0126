"""Small shared helpers: target-module matching, optional-dependency checks, logging."""
from .imports import is_bitsandbytes_available, require
from .targets import find_target_linears


__all__ = ["find_target_linears", "is_bitsandbytes_available", "require"]
