"""Target-module selection with the exact semantics of transformers' `optim_target_modules`.

- ``"all-linear"``: every ``nn.Linear``.
- a string: a regular expression matched in full against the module name.
- a list: each entry matches a module name exactly, as a substring, or as a full-match regex.
"""
import re
from typing import Iterable, Sequence, Union

import torch.nn as nn


TargetModules = Union[str, Sequence[str]]


def normalize_target_modules(target_modules) -> TargetModules:
    """Config-time check: a str stays a str, a list/tuple/set becomes a list; anything else is a TypeError."""
    if isinstance(target_modules, (list, tuple, set)):
        return list(target_modules)
    if not isinstance(target_modules, str):
        raise TypeError(f"`target_modules` must be a str or a list of str, got {type(target_modules).__name__}.")
    return target_modules


def module_matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, name) is not None
    return any(t == name or t in name or re.fullmatch(t, name) is not None for t in target_modules)


def find_target_linears(
    model: nn.Module,
    target_modules: TargetModules,
    module_types: Iterable[type] = (nn.Linear,),
    parameter_name: str = "target_modules",
) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` for every module of `module_types` matched by `target_modules`.

    Raises ValueError naming `parameter_name` and listing a few candidate names when nothing matches.
    """
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        raise ValueError(f"`{parameter_name}` is empty: pass 'all-linear', a regex, or a list of module names.")
    module_types = tuple(module_types)
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, module_types)]
    matched = [(n, m) for n, m in candidates if module_matches(n, target_modules)]
    if not matched:
        examples = ", ".join(repr(n) for n, _ in candidates[:6]) or "(the model has none)"
        kinds = "/".join(t.__name__ for t in module_types)
        raise ValueError(
            f"`{parameter_name}`={target_modules!r} matched no {kinds} module. "
            f"Module names look like: {examples}. Use 'all-linear', a full-match regex, or a list of names/substrings."
        )
    return matched
