"""Refresh policies: when a projected parameter's subspace is recomputed.

- ``fixed``: every ``update_proj_gap`` steps of the parameter's counter (0, T, 2T, ...), as GaLore.
- ``lazy`` (Q-GaLore, Zhang et al. 2024, arXiv 2407.08296): after each refresh, the |cosine| between the new and
  the previous leading basis vector (sign-free: a singular vector's sign is arbitrary) enters a queue of
  ``queue_size``; when the queue is full and its mean is at least ``cos_threshold``, the parameter's gap is
  multiplied by ``gamma_proj``. Q-GaLore never clears the queue, so a stable layer's gap keeps growing at every
  refresh (``queue_reset=False``, the default); ``queue_reset=True`` clears it after each growth, so the next
  growth needs ``queue_size`` new agreeing refreshes.

Per-parameter policy state (plain numbers in ``optimizer.state``, so it is saved and resumed): ``refresh_gap``,
``next_refresh``, ``cos_queue`` and ``refreshes``.
"""
import torch


REFRESH_POLICIES = ("fixed", "lazy")
REFRESH_DEFAULTS = {"refresh": "fixed", "cos_threshold": 0.4, "gamma_proj": 2.0, "queue_size": 5,
                    "queue_reset": False}


def validate(group: dict) -> None:
    if group["refresh"] not in REFRESH_POLICIES:
        raise ValueError(f"`refresh`={group['refresh']!r}; use one of {list(REFRESH_POLICIES)}.")
    threshold = group["cos_threshold"]
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"`cos_threshold` must be in [0, 1] (an |cosine|), got {threshold!r}.")
    if not isinstance(group["gamma_proj"], (int, float)) or group["gamma_proj"] < 1:
        raise ValueError(f"`gamma_proj` must be >= 1 (the factor a stable layer's gap grows by), got {group['gamma_proj']!r}.")
    size = group["queue_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"`queue_size` must be an int >= 1, got {size!r}.")
    if not isinstance(group["queue_reset"], bool):
        raise ValueError(f"`queue_reset` must be True or False, got {group['queue_reset']!r}.")


def is_due(state: dict, step: int, group: dict) -> bool:
    if group["refresh"] == "fixed":
        return step % group["update_proj_gap"] == 0
    return step >= state.get("next_refresh", 0)


def leading_direction(basis: torch.Tensor) -> torch.Tensor:
    return basis[:, 0].float().clone()


def record(states: list[dict], steps: list[int], previous: list[torch.Tensor | None], current: list[torch.Tensor],
           group: dict) -> None:
    """Book-keeping after refreshes at ``steps``: ``previous``/``current`` leading directions (None: first fit).
    The cosines are read to the host in one transfer (refreshes already synchronise)."""
    pairs = [i for i, prev in enumerate(previous) if prev is not None]
    cosines = []
    if pairs:
        cosines = torch.stack([torch.nn.functional.cosine_similarity(previous[i], current[i], dim=0).abs()
                               for i in pairs]).tolist()
    cosine_of = dict(zip(pairs, cosines))
    for i, (state, step) in enumerate(zip(states, steps)):
        state["refreshes"] = state.get("refreshes", 0) + 1
        if group["refresh"] != "lazy":
            continue
        gap = state.get("refresh_gap", group["update_proj_gap"])
        queue = list(state.get("cos_queue", []))
        if i in cosine_of:
            queue = (queue + [cosine_of[i]])[-group["queue_size"]:]
            if len(queue) == group["queue_size"] and sum(queue) / len(queue) >= group["cos_threshold"]:
                gap = int(gap * group["gamma_proj"])
                if group["queue_reset"]:
                    queue = []
        state.update(refresh_gap=gap, next_refresh=step + gap, cos_queue=queue)


def report(state: dict, step: int, group: dict) -> dict:
    """``refreshes`` done, ``scheduled`` (what the fixed gap would have done by ``step``), ``skipped`` and the
    current ``gap``."""
    scheduled = 0 if step <= 0 else (step - 1) // group["update_proj_gap"] + 1
    refreshes = state.get("refreshes", 0)
    return {"refreshes": refreshes, "scheduled": scheduled, "skipped": max(0, scheduled - refreshes),
            "gap": state.get("refresh_gap", group["update_proj_gap"])}
