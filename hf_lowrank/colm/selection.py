"""Coreset selection: per-source budgets, facility location by lazy greedy, medoid weights.

Facility location maximises F(A) = sum_i max_{j in A} S_ij over sets of k medoids; greedy reaches at least
(1 - 1/e) of the optimum, and lazy greedy (Minoux) returns exactly greedy's picks while re-evaluating only the
candidates whose stale gain bound could still win.
"""
import heapq
from dataclasses import dataclass

import torch


def similarity_matrix(features: torch.Tensor, kind: str) -> torch.Tensor:
    """Non-negative n x n similarities: ``l1`` / ``l2`` as max(D) - D of the pairwise distances, ``cosine`` as
    1 + cos (a constant shift adds n to F(A) for every non-empty A, so it changes no choice)."""
    features = features.float()
    if kind == "cosine":
        unit = torch.nn.functional.normalize(features, dim=1)
        return 1.0 + unit @ unit.T
    if kind not in ("l1", "l2"):
        raise ValueError(f"similarity={kind!r}; use 'l1', 'l2' or 'cosine'.")
    distances = torch.cdist(features[None], features[None], p=1.0 if kind == "l1" else 2.0)[0]
    return distances.max() - distances


def facility_location_value(similarity: torch.Tensor, medoids) -> float:
    """F(A) = sum_i max_{j in A} S_ij (0 for the empty set)."""
    if len(medoids) == 0:
        return 0.0
    return float(similarity[:, list(medoids)].max(dim=1).values.sum())


def _gain(similarity: torch.Tensor, covered: torch.Tensor, j: int) -> float:
    return float((similarity[:, j] - covered).clamp_min(0).sum())


def lazy_greedy(similarity: torch.Tensor, k: int) -> list[int]:
    """The k medoids greedy facility location picks, in pick order (ties: the lower index), by lazy evaluation."""
    n = similarity.shape[0]
    if similarity.shape != (n, n):
        raise ValueError(f"similarity must be square, got shape {tuple(similarity.shape)}.")
    k = min(k, n)
    covered = torch.zeros(n, dtype=similarity.dtype)
    heap = [(-_gain(similarity, covered, j), j) for j in range(n)]
    heapq.heapify(heap)
    chosen = []
    while len(chosen) < k:
        _, j = heapq.heappop(heap)
        entry = (-_gain(similarity, covered, j), j)
        if not heap or entry <= heap[0]:  # no stale bound can beat the fresh gain
            chosen.append(j)
            covered = torch.maximum(covered, similarity[:, j])
        else:
            heapq.heappush(heap, entry)
    return chosen


def medoid_weights(similarity: torch.Tensor, medoids: list[int]) -> torch.Tensor:
    """How many examples each medoid stands for: every example counts for its most similar medoid (the first in
    pick order on ties), and each medoid for itself. The weights sum to n."""
    assignment = similarity[:, medoids].argmax(dim=1)
    assignment[torch.tensor(medoids)] = torch.arange(len(medoids))
    return torch.bincount(assignment, minlength=len(medoids)).float()


def sparsify(features: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``dim`` columns with the largest mean |feature| over the rows (all columns when there are fewer)."""
    if features.shape[1] <= dim:
        return features
    return features[:, features.mean(dim=0).abs().topk(dim).indices]


def source_budgets(counts: dict, budget: int) -> dict:
    """Medoids per large source, proportional to its count: the floor, then the largest remainders (ties: the
    larger source, then first seen), at least one per source and at most its count. When ``budget`` is below the
    number of sources, each still gets one (the coreset is then larger than asked)."""
    total = sum(counts.values())
    if budget >= total:
        return dict(counts)
    budget = max(budget, len(counts))
    exact = {s: n * budget / total for s, n in counts.items()}
    out = {s: min(n, max(1, int(exact[s]))) for s, n in counts.items()}
    order = sorted(counts, key=lambda s: (-(exact[s] - int(exact[s])), -counts[s]))
    while sum(out.values()) < budget:
        for s in order:
            if sum(out.values()) < budget and out[s] < counts[s]:
                out[s] += 1
    while sum(out.values()) > budget:  # the at-least-one rule overshot: take back from the largest budgets
        s = max((s for s in out if out[s] > 1), key=lambda s: out[s])
        out[s] -= 1
    return out


@dataclass
class BatchPlan:
    """Which examples of a large batch are kept, and how many medoids each large source gets."""

    keep: list[int]  # indices of small-source examples (weight 1)
    groups: dict  # large source -> indices of its examples in the batch
    budgets: dict  # large source -> medoids to pick


def plan_batch(sources: list, small_sources: set, size: int) -> BatchPlan:
    """Keep every small-source example; split the rest of the ``size`` budget over the large sources."""
    keep = [i for i, s in enumerate(sources) if s in small_sources]
    groups: dict = {}
    for i, s in enumerate(sources):
        if s not in small_sources:
            groups.setdefault(s, []).append(i)
    budgets = source_budgets({s: len(ix) for s, ix in groups.items()}, size - len(keep)) if groups else {}
    return BatchPlan(keep=keep, groups=groups, budgets=budgets)


def select_medoids(features: torch.Tensor, budget: int, similarity: str, sparse_dim: int):
    """``(medoid rows, weights)`` of one source's features: sparsify, similarities, lazy greedy, cluster sizes."""
    s = similarity_matrix(sparsify(features, sparse_dim), similarity).cpu()
    medoids = lazy_greedy(s, budget)
    return medoids, medoid_weights(s, medoids)
