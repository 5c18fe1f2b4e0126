"""Target-module selection, one definition for every method (transformers' ``optim_target_modules`` / peft).

- ``"all-linear"``: every linear layer (``nn.Linear`` and transformers' ``Conv1D``, GPT-2's linear layer) except
  the output head (``model.get_output_embeddings()``, peft's rule); a tied input embedding therefore stays
  unprojected too.
- a string: a regular expression matched in full against the module name.
- a list: each entry matches a module name exactly, as a substring, or as a full-match regex. The output head is
  targeted only when named.

An entry that matches modules but none of the supported types (``embed_tokens``, a norm) is never dropped silently:
it warns, naming the entry and the types it matched, or raises (``unsupported="raise"``) for methods that cannot
skip it.
"""
import re
import warnings
from typing import Iterable, Sequence, Union

import torch
import torch.nn as nn


TargetModules = Union[str, Sequence[str]]


def linear_types() -> tuple[type, ...]:
    """The module types that are linear layers: ``nn.Linear`` and transformers' ``Conv1D`` (weight stored in x out)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, linear_types()[1])


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``out x in`` (a transposed view for ``Conv1D``, which stores ``in x out``)."""
    return module.weight.T if is_conv1d(module) else module.weight


def normalize_target_modules(target_modules, parameter_name: str = "target_modules") -> TargetModules:
    """Config-time check: a str stays a str, a list/tuple/set of str becomes a list; anything else is a TypeError."""
    if isinstance(target_modules, (list, tuple, set)):
        bad = [t for t in target_modules if not isinstance(t, str)]
        if bad:
            raise TypeError(f"`{parameter_name}` entries must be strings (module names, substrings or regexes); "
                            f"got {bad!r}.")
        return list(target_modules)
    if not isinstance(target_modules, str):
        raise TypeError(f"`{parameter_name}` must be 'all-linear', a regex string or a list of module names, got "
                        f"{type(target_modules).__name__} {target_modules!r}.")
    return target_modules


def module_matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, name) is not None
    return any(t == name or t in name or re.fullmatch(t, name) is not None for t in target_modules)


def output_head(model: nn.Module) -> nn.Module | None:
    """The output projection (``lm_head``) of a transformers model, or None."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def find_target_linears(
    model: nn.Module,
    target_modules: TargetModules,
    module_types: Iterable[type] | None = None,
    parameter_name: str = "target_modules",
    exclude: TargetModules | None = None,
    unsupported: str = "warn",
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every module of ``module_types`` (default: :func:`linear_types`) matched by
    ``target_modules``, in model order, minus those matched by ``exclude``.

    Raises ValueError naming ``parameter_name`` (with a few candidate names) when nothing matches; see the module
    docstring for ``"all-linear"`` and for entries that match only unsupported modules.
    """
    target_modules = normalize_target_modules(target_modules, parameter_name)
    if not isinstance(target_modules, str) and len(target_modules) == 0:
        raise ValueError(f"`{parameter_name}` is empty: pass 'all-linear', a regex, or a list of module names.")
    module_types = tuple(module_types or linear_types())
    kinds = "/".join(t.__name__ for t in module_types)
    named = [(n, m) for n, m in model.named_modules() if not (exclude and module_matches(n, exclude))]
    if target_modules == "all-linear":
        head = output_head(model)
        matched = [(n, m) for n, m in named if isinstance(m, module_types) and m is not head]
    else:
        matched = [(n, m) for n, m in named if isinstance(m, module_types) and module_matches(n, target_modules)]
        _check_entries(named, target_modules, module_types, parameter_name, unsupported)
    if not matched:
        examples = ", ".join(repr(n) for n, m in named if isinstance(m, module_types))[:300] or "(the model has none)"
        raise ValueError(
            f"`{parameter_name}`={target_modules!r} matched no {kinds} module"
            f"{' (the output head is left out of all-linear)' if target_modules == 'all-linear' else ''}. "
            f"Such modules are named like: {examples}. Use 'all-linear', a full-match regex, or a list of "
            "names/substrings."
        )
    return matched


def _check_entries(named, target_modules, module_types, parameter_name, unsupported) -> None:
    entries = [target_modules] if isinstance(target_modules, str) else [[entry] for entry in target_modules]
    for entry in entries:
        hits = [(n, m) for n, m in named if module_matches(n, entry)]
        if hits and not any(isinstance(m, module_types) for _, m in hits):
            shown = entry if isinstance(entry, str) else entry[0]
            types = sorted({type(m).__name__ for _, m in hits})
            message = (f"`{parameter_name}` entry {shown!r} matches {types} module(s) (e.g. {hits[0][0]!r}) but no "
                       f"{'/'.join(t.__name__ for t in module_types)}, so it selects nothing. Remove it or name the "
                       "linear projections (e.g. 'q_proj', 'mlp').")
            if unsupported == "raise":
                raise ValueError(message)
            warnings.warn(message, stacklevel=3)
