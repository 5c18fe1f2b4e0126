"""The warm-started subspace-iteration projector (``galore_subspace``) against exact-SVD GaLore.

1. Refresh time of one 2048 x 5461 fp32 matrix (a LLaMA-1B MLP weight) at rank 512, side by side in one process
   (round-robin): exact SVD, randomized SVD, and a warm-started refresh (from the basis of a previous gradient
   of the same matrix: the gradient plus 10% noise).
2. The convergence benchmark (``benchmarks/convergence.py`` defaults: tiny LLaMA, byte-level tiny Shakespeare,
   300 steps, rank 32, gap 50), `galore` vs `galore_subspace`, seeds 0, 1, 2; and, at every refresh of
   `galore_subspace`, the overlap ``||Q_subᵀ Q_svd||_F² / r`` of its basis with the exact SVD basis of the same
   gradient (1 = the same subspace).

    python benchmarks/subspace_projector.py
"""
import argparse
import json
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import convergence  # noqa: E402
from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR, command_line, interleaved_times, markdown_table, median, new_figure, setup_environment,
    write_results,
)
from hf_lowrank.projectors import PROJECTORS, SVDProjector, SubspaceIterationProjector, get_projector  # noqa: E402


NAME = "subspace_projector"
RECORDED = "subspace_recorded"
ARMS = ["galore", f"galore:projector={RECORDED}"]


class RecordingSubspaceProjector(SubspaceIterationProjector):
    """The subspace projector, recording at each warm refresh its overlap with the exact SVD basis."""

    overlaps: list[tuple[int, float]] = []

    def _singular_vectors(self, grad):
        warm = self._q is not None
        basis = super()._singular_vectors(grad)
        if warm:
            exact = SVDProjector._singular_vectors(self, grad)
            type(self).overlaps.append((len(type(self).overlaps), float((basis.T @ exact).pow(2).sum() / self.rank)))
        return basis


PROJECTORS[RECORDED] = RecordingSubspaceProjector


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[2048, 5461])
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the refresh timing")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    return parser.parse_args(argv)


def time_refreshes(args) -> dict:
    shape, rank = tuple(args.shape), args.rank
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=generator)
    previous = grad + 0.1 * torch.randn(shape, generator=generator)
    projectors = {name: get_projector(name, shape, rank) for name in ("svd", "randomized", "subspace")}
    projectors["subspace"].update(previous)  # its timed refreshes start from this basis
    warm_state = projectors["subspace"].state_dict()

    def warm_refresh():
        projectors["subspace"].load_state_dict(warm_state)
        projectors["subspace"].update(grad)

    fns = {"svd": lambda: projectors["svd"].update(grad), "randomized": lambda: projectors["randomized"].update(grad),
           "subspace (warm)": warm_refresh}
    times = interleaved_times(fns, repeats=args.repeats, warmup=0, progress="refresh")
    return {name: median([r["total"] for r in rounds]) for name, rounds in times.items()}


def run_arm(job):
    name, seed, steps = job
    RecordingSubspaceProjector.overlaps = []
    result = convergence.train(name, convergence.parse_args(["--seed", str(seed), "--steps", str(steps),
                                                             "--no-galore-torch", "--modes", *ARMS]))
    overlaps = [o for _, o in RecordingSubspaceProjector.overlaps]
    return name, seed, result["eval"][-1][1], overlaps


def main(argv=None):
    args = parse_args(argv)
    setup_environment(threads=args.threads)
    refresh = time_refreshes(args)
    jobs = [(name, seed, args.steps) for seed in args.seeds for name in ARMS]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(run_arm, jobs))
    finals = {name: [loss for n, _, loss, _ in runs if n == name] for name in ARMS}
    overlaps = [o for n, _, _, seq in runs if n == ARMS[1] for o in seq]
    ratio = statistics.mean(finals[ARMS[1]]) / statistics.mean(finals["galore"])
    speedup = refresh["svd"] / refresh["subspace (warm)"]
    refresh_rows = [[name, f"{t:.3f}", f"{refresh['svd'] / t:.1f}x"] for name, t in refresh.items()]
    loss_rows = [[name if name == "galore" else "galore_subspace", f"{statistics.mean(v):.4f}",
                  " / ".join(f"{x:.4f}" for x in v)] for name, v in finals.items()]
    targets = [
        f"- Warm-started refresh of {args.shape[0]}x{args.shape[1]} at rank {args.rank}: {speedup:.1f}x faster than "
        f"exact SVD (target >= 20x: {'met' if speedup >= 20 else 'MISSED'}).",
        f"- `galore_subspace` mean final eval loss {ratio:.4f}x `galore`'s (target within 0.5%: "
        f"{'met' if ratio <= 1.005 else 'MISSED'}).",
        f"- Overlap with the exact SVD basis over {len(overlaps)} warm refreshes (all seeds, every matrix): "
        + (f"mean {statistics.mean(overlaps):.3f}, min {min(overlaps):.3f}." if overlaps else "none in this budget."),
    ]
    markdown = "\n".join([
        "# Warm-started subspace iteration vs exact SVD", "", f"Command: `{command_line(NAME, argv)}`", "",
        f"## One refresh ({args.threads} threads, median of {args.repeats} interleaved rounds)", "",
        markdown_table(["projector", "seconds", "speed-up vs exact SVD"], refresh_rows), "",
        f"## Convergence benchmark ({args.steps} steps, seeds {', '.join(map(str, args.seeds))})", "",
        markdown_table(["mode", "final eval loss (mean)", "per seed"], loss_rows), "", "## Targets", "", *targets,
    ])
    figure, axes = new_figure(ncols=1, width=6)
    axes[0, 0].plot(overlaps, ".", ms=3)
    axes[0, 0].set(xlabel="warm refresh (all matrices, in order)", ylabel="overlap with exact SVD basis",
                   ylim=(0, 1.05), title="galore_subspace")
    out_dir = Path(args.out_dir)
    write_results(NAME, out_dir, markdown, figure)
    (out_dir / f"{NAME}.json").write_text(json.dumps({"refresh": refresh, "finals": finals, "overlaps": overlaps}))


if __name__ == "__main__":
    main()
