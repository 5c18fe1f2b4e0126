"""Q-GaLore on the tiny LLaMA pre-training benchmark: convergence vs GaLore, SVDs the lazy rule skips, step time.

Protocol (fixed before the first run; nothing below is tuned, every arm uses the same settings):

- model: LLaMA hidden 256, intermediate 768, 4 layers, 4 heads, byte-level vocab 256, trained from scratch on the
  shipped tiny-Shakespeare train split; eval = mean loss on 128 fixed windows of the held-out split (the only
  split ever evaluated; no choice is made on it).
- training: 600 steps of 8 x 64 tokens, cosine schedule with 10% warm-up to 10% of the peak, lr 1e-2 (projected
  weights: scale 0.25), no weight decay, rank 64 (= hidden / 4), update_proj_gap 20 (30 scheduled refreshes, so
  the lazy rule's queue of 5 fills early, as it does over a paper-length run at gap 200).
- arms: torch AdamW (lr 1e-3, the convergence benchmark's baseline), `galore`, `galore` with the lazy policy,
  `q_galore` (INT8 weights in groups of 256 with stochastic rounding, INT4 projectors, 8-bit AdamW, lazy refresh
  with cos 0.4 / gamma 2 / queue 5, as the paper), `q_galore` with the fixed gap.
- seeds 0, 1, 2 (initialisation and batch order); reported: mean and per-seed final eval loss.
- targets: `q_galore` mean final eval loss within 3% of `galore`'s; the fraction of scheduled SVDs the lazy rule
  skipped (paper: about 36% of SVDs needed at equal perplexity).
- step time: `q_galore` / `galore` (and / `galore_8bit`, the same inner optimizer) per-step time, side by side in one process (round-robin, 1 thread,
  ``benchmarks/step_time.py``'s harness), on step_time's default model (hidden 256, vocab 8192, batch 8 x 128).

    python benchmarks/qgalore.py            # about 25 minutes on 2 cores
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

from benchmarks import convergence, step_time  # noqa: E402
from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR, command_line, format_bytes, markdown_table, new_figure, setup_environment, write_results,
)


NAME = "qgalore"
ARMS = ["galore", "galore:refresh=lazy", "q_galore", "q_galore:refresh=fixed"]
CONVERGENCE_ARGS = ["--hidden", "256", "--intermediate", "768", "--layers", "4", "--heads", "4", "--steps", "600",
                    "--batch", "8", "--seq", "64", "--rank", "64", "--gap", "20", "--lr", "1e-2",
                    "--eval-every", "100", "--weight-group-size", "256", "--no-galore-torch", "--modes", *ARMS]
SEEDS = (0, 1, 2)
PAPER_SVD_FRACTION = 0.36


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="override the step budget (quick tests only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--rounds", type=int, default=30, help="timed step-time rounds")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    return parser.parse_args(argv)


def run_arm(job):
    name, seed, steps = job
    extra = ["--seed", str(seed)] + (["--steps", str(steps), "--eval-every", str(steps)] if steps else [])
    result = convergence.train(name, convergence.parse_args(CONVERGENCE_ARGS + extra))
    return name, seed, result


def main(argv=None):
    args = parse_args(argv)
    setup_environment(threads=1)
    names = list(convergence.make_optimizers(convergence.parse_args(CONVERGENCE_ARGS)))
    jobs = [(name, seed, args.steps) for seed in args.seeds for name in names]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(run_arm, jobs))
    results = {name: {} for name in names}
    for name, seed, result in runs:
        results[name][seed] = result

    timing = step_time.time_train_steps(step_time.parse_args(
        ["--modes", "galore", "galore_8bit", "q_galore", "--no-galore-torch", "--rounds", str(args.rounds)]))

    def final(name):
        return [results[name][s]["eval"][-1][1] for s in args.seeds]

    def fraction(name):
        """SVDs done / scheduled over the seeds (None without a projector)."""
        runs_of = [results[name][s] for s in args.seeds]
        scheduled = sum(r["scheduled"] for r in runs_of)
        return sum(r["refreshes"] for r in runs_of) / scheduled if scheduled else None

    galore_mean = statistics.mean(final("galore"))
    rows = []
    for name in names:
        losses = final(name)
        svds = "-" if fraction(name) is None else f"{fraction(name):.1%}"
        rows.append([name, f"{statistics.mean(losses):.4f}", " / ".join(f"{v:.4f}" for v in losses),
                     f"{statistics.mean(losses) / galore_mean:.4f}", svds,
                     format_bytes(results[name][args.seeds[0]]["state_bytes"])])
    q_ratio = statistics.mean(final("q_galore")) / galore_mean

    regular = {name: split["regular"] for name, split in timing.items()}
    step_ratio = sum(regular["q_galore"].values()) / sum(regular["galore"].values())
    step_ratio_8bit = sum(regular["q_galore"].values()) / sum(regular["galore_8bit"].values())
    opt_ratio = regular["q_galore"]["opt"] / regular["galore"]["opt"]
    fwd_bwd_ratio = regular["q_galore"]["fwd_bwd"] / regular["galore"]["fwd_bwd"]
    amortized = {name: sum(step_time.amortized(split, part, 200) for part in ("fwd_bwd", "opt"))
                 for name, split in timing.items()}
    targets = [
        f"- `q_galore` mean final eval loss {q_ratio:.4f}x `galore`'s (target within 3%: "
        f"{'met' if q_ratio <= 1.03 else 'MISSED'}).",
        f"- SVDs performed / scheduled with the lazy rule: `q_galore` {fraction('q_galore'):.1%}, `galore` with the "
        f"lazy policy {fraction('galore:refresh=lazy'):.1%} (paper: about {PAPER_SVD_FRACTION:.0%} needed).",
        f"- Step time `q_galore` / `galore` (regular steps, forward + backward + optimizer step, median of "
        f"{args.rounds} interleaved rounds): {step_ratio:.3f} (forward + backward {fwd_bwd_ratio:.3f}, optimizer step "
        f"{opt_ratio:.3f}); amortized at gap 200 (refresh steps included): "
        f"{amortized['q_galore'] / amortized['galore']:.3f} (paper, GPU: about 1.15). Against `galore_8bit` (the "
        f"same 8-bit inner optimizer, so the difference is the INT8 weights and INT4 projectors): "
        f"{step_ratio_8bit:.3f}.",
    ]
    markdown = "\n".join([
        "# Q-GaLore vs GaLore: tiny LLaMA pre-training (tiny Shakespeare, byte level)", "",
        f"Command: `{command_line(NAME, argv)}`", "",
        "Protocol fixed before the run (see the script's docstring): hidden 256, intermediate 768, 4 layers, 600 steps "
        "of 8 x 64 tokens, lr 1e-2 cosine, rank 64, gap 20, seeds " + ", ".join(map(str, args.seeds)) + "; eval on "
        "the held-out split only. `q_galore`: INT8 weights (groups of 256, stochastic rounding), INT4 projectors, "
        "8-bit AdamW, lazy refresh (cos 0.4, gamma 2, queue 5).", "",
        markdown_table(["arm", "final eval loss (mean)", "per seed", "x galore", "SVDs done / scheduled",
                        "optimizer state"], rows),
        "", "## Targets", "", *targets,
    ])
    figure, axes = new_figure(ncols=2, width=6)
    for name in names:
        steps, losses = zip(*results[name][args.seeds[0]]["eval"])
        axes[0, 0].plot(steps, losses, marker="o", ms=3, label=name)
        axes[0, 1].plot(convergence.smooth(results[name][args.seeds[0]]["train"]), lw=1, label=name)
    axes[0, 0].set(xlabel="step", ylabel="held-out loss", title=f"eval loss (seed {args.seeds[0]})")
    axes[0, 1].set(xlabel="step", ylabel="train loss (EMA 0.9)", title="train loss")
    axes[0, 0].legend(fontsize=7)
    out_dir = Path(args.out_dir)
    write_results(NAME, out_dir, markdown, figure)
    (out_dir / f"{NAME}.json").write_text(json.dumps({"results": results, "timing": timing}, indent=2))


if __name__ == "__main__":
    main()
