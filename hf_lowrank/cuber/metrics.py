"""Continual-learning metrics: the accuracy matrix ``R[i, j]`` (accuracy on task ``j`` after training task ``i``),
ACC = mean_j R[T, j] and BWT = mean_{j<T} (R[T, j] − R[j, j]) (Lopez-Paz & Ranzato 2017; GPM/TRGP code)."""
import json
import math
import os

import numpy as np


def average_accuracy(matrix) -> float:
    """Mean accuracy over all tasks after the last one was trained."""
    matrix = np.asarray(matrix, dtype=float)
    return float(np.mean(matrix[-1, : matrix.shape[0]]))


def backward_transfer(matrix) -> float:
    """Mean change of each old task's accuracy between right after it was learnt and the end; NaN for one task."""
    matrix = np.asarray(matrix, dtype=float)
    tasks = matrix.shape[0]
    if tasks < 2:
        return float("nan")
    return float(np.mean([matrix[-1, j] - matrix[j, j] for j in range(tasks - 1)]))


class AccuracyMatrix:
    """Grows one row per finished task; entries above the diagonal are NaN (task not seen yet)."""

    def __init__(self, task_ids=(), rows=()):
        self.task_ids = list(task_ids)
        self.rows = [list(map(float, row)) for row in rows]

    def add_row(self, task_id, accuracies) -> None:
        """Add the row after training ``task_id``: ``accuracies`` holds one value per task seen so far."""
        if len(accuracies) != len(self.task_ids) + 1:
            raise ValueError(f"Row for task {task_id!r} has {len(accuracies)} entries; expected {len(self.task_ids) + 1}.")
        self.task_ids.append(task_id)
        self.rows.append([float(a) for a in accuracies])

    @property
    def values(self) -> np.ndarray:
        n = len(self.rows)
        matrix = np.full((n, n), np.nan)
        for i, row in enumerate(self.rows):
            matrix[i, : len(row)] = row
        return matrix

    def acc(self) -> float:
        return average_accuracy(self.values) if self.rows else float("nan")

    def bwt(self) -> float:
        return backward_transfer(self.values) if self.rows else float("nan")

    def to_dict(self) -> dict:
        clean = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
        return {
            "task_ids": self.task_ids,
            "R": [[clean(float(x)) for x in row] for row in self.values],
            "ACC": clean(self.acc()),
            "BWT": clean(self.bwt()),
        }

    def save_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load_json(cls, path: str) -> "AccuracyMatrix":
        with open(path) as f:
            data = json.load(f)
        return cls(data["task_ids"], [[x for x in row[: i + 1]] for i, row in enumerate(data["R"])])

    def plot(self, path: str, title: str = "Accuracy matrix R[i, j]") -> None:
        """Heat map of R with the values written in; rows: after task i, columns: evaluated on task j."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        matrix = self.values
        labels = [str(t) for t in self.task_ids]
        fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(labels), 0.8 + 0.6 * len(labels)))
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=max(1.0, np.nanmax(matrix)), cmap="viridis")
        for i in range(len(labels)):
            for j in range(i + 1):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=45)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("after training task i")
        ax.set_title(f"{title}\nACC={self.acc():.3f}  BWT={self.bwt():+.3f}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
