"""Small shared helpers: target-module matching, optional-dependency checks, logging.

``targets`` (which needs torch) is imported on first use, so ``import hf_lowrank`` can install the logging filters of
``imports`` without importing torch."""
import importlib

from .imports import is_bitsandbytes_available, require


__all__ = ["find_target_linears", "is_bitsandbytes_available", "require"]


def __getattr__(name):
    if name == "find_target_linears":
        return importlib.import_module(".targets", __name__).find_target_linears
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
