"""OwLore vs LISA vs GaLore vs full fine-tuning on SmolLM2-135M, shipped commonsense data, offline.

    python benchmarks/owlore.py                     # lr selection on the held-out slice, then 3 seeds

Protocol (fixed in ``benchmarks/results/owlore_PROTOCOL.md`` before the run):
- training data: the shipped commonsense mix (``data/commonsense/train_mix.json``), shuffled once (seed 1234); the
  first ``--heldout`` records are a held-out slice used only to choose the learning rate (answer NLL), the rest
  train. Every arm sees the same examples in the same order for a given seed: equal steps and equal tokens.
- arms: ``full`` (AdamW, every parameter), ``galore`` (GaLore on attention + MLP, AdamW elsewhere), ``lisa``
  (gamma blocks sampled uniformly every ``--interval`` steps, AdamW), ``owlore`` (gamma blocks sampled by OWL outlier
  ratio, M from ``--m``, on calibration prompts of the training slice; GaLore inside). Embeddings, final norm and
  head train in every arm.
- lr: the grid of each arm on seed 0, chosen by held-out answer NLL; then seeds 0..2 at the chosen lr.
- test: the first ``--eval-per-task`` items of each shipped test set (BoolQ, PIQA, SIQA, ARC-e, ARC-c), scored by
  answer log-likelihood (the commonsense recipe's scorer), never used for any choice.
Per run: accuracy per task, optimizer-state bytes after every step (max and whether it stays flat), peak RSS
above the pre-model baseline, and median step time (runs execute two at a time: ratios are indicative, not
interleaved).
"""
import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from benchmarks import common  # noqa: E402


NAME = "owlore"
ARMS = ("full", "galore", "lisa", "owlore")
LR_GRID = {"full": (2e-5, 1e-4), "galore": (1e-4, 5e-4), "lisa": (1e-4, 5e-4), "owlore": (1e-4, 5e-4)}
TASKS = ("boolq", "piqa", "social_i_qa", "ARC-Easy", "ARC-Challenge")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--gap", type=int, default=20)
    parser.add_argument("--m", type=float, default=13.0)
    parser.add_argument("--heldout", type=int, default=48)
    parser.add_argument("--eval-per-task", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out-dir", default=str(common.DEFAULT_OUT_DIR))
    return parser.parse_args(argv)


def run(arm: str, lr: float, seed: int, args) -> dict:
    """One training run in this (fresh, one-thread) process; returns its measurements."""
    torch.set_num_threads(1)
    import commonsense
    import models
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from hf_lowrank import create_optimizer, optimizer_state_bytes
    from hf_lowrank.owlore import compute_outlier_ratios, setup

    baseline = common.rss_kb()
    model, tokenizer = models.load_causal_lm(args.model, dtype=torch.float32)
    records = commonsense.read_records(commonsense.SHIPPED_TRAIN)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(1234)).tolist()
    heldout = [records[i] for i in order[: args.heldout]]
    train = [records[i] for i in order[args.heldout:]]
    cfg = commonsense.CommonsenseConfig(max_seq_length=args.seq, train_on_inputs=False)
    train_set = commonsense.training_dataset(train, tokenizer, cfg)
    heldout_set = commonsense.training_dataset(heldout, tokenizer, cfg)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    galore = {"rank": args.rank, "update_proj_gap": args.gap, "scale": 1.0, "target_modules": ["attn", "mlp"]}
    callbacks = []
    if arm == "full":
        optimizer = create_optimizer(model, "adamw", lr=lr)
    elif arm == "galore":
        optimizer = create_optimizer(model, "galore", lr=lr, **galore)
    else:
        ratios = None
        if arm == "owlore":
            from torch.utils.data import DataLoader

            loader = DataLoader(train_set, batch_size=args.batch, collate_fn=collator)
            batches = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                       for _, b in zip(range(8), loader)]
            ratios = compute_outlier_ratios(model, batches, M=args.m)
        options = galore if arm == "owlore" else {}
        optimizer, callback = setup(model, ratios=ratios, gamma=args.gamma, interval=args.interval,
                                    sampling="owl" if arm == "owlore" else "uniform", seed=seed,
                                    mode="galore" if arm == "owlore" else "adamw", lr=lr, **options)
        callbacks.append(callback)

    class Probe(TrainerCallback):
        def __init__(self):
            self.state_bytes, self.times, self.started = [], [], None

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()
            if len(self.times) == 1:
                common.reset_peak_rss()

        def on_step_end(self, *a, optimizer=None, **k):
            self.times.append(time.perf_counter() - self.started)
            self.state_bytes.append(optimizer_state_bytes(optimizer))

    probe = Probe()
    training_args = TrainingArguments(
        output_dir=f"/tmp/owlore-bench/{arm}-{lr}-{seed}", max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=16, lr_scheduler_type="constant", warmup_steps=0, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=seed, max_grad_norm=1.0, weight_decay=0.0)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=collator,
                      optimizers=(optimizer, None), callbacks=[*callbacks, probe])
    trainer.train()
    peak = (common.rss_kb("VmHWM") - baseline) * 1024
    heldout_loss = trainer.evaluate(heldout_set)["eval_loss"]
    tests = {task: commonsense.read_records(commonsense.SHIPPED_DATA / task / "test.json")[: args.eval_per_task]
             for task in TASKS}
    accuracy = commonsense.evaluate(model, tokenizer, tests, eval_mode="loglik", batch_size=16, max_new_tokens=1,
                                    num_beams=1, progress=False)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"arm": arm, "lr": lr, "seed": seed, "heldout_loss": heldout_loss, "accuracy": accuracy,
            "state_bytes": probe.state_bytes, "peak_bytes": peak, "step_seconds": statistics.median(probe.times[1:]),
            "train_loss_last10": sum(losses[-10:]) / len(losses[-10:])}


def run_all(jobs, args, results_path: Path):
    done = json.loads(results_path.read_text()) if results_path.exists() else []
    keys = {(r["arm"], r["lr"], r["seed"]) for r in done}
    todo = [job for job in jobs if job not in keys]
    os.environ.update({"OMP_NUM_THREADS": "1", **common.RSS_TRACKING_ENV})
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for result in pool.map(run, *zip(*[(a, lr, s, args) for a, lr, s in todo])) if todo else []:
            done.append(result)
            results_path.write_text(json.dumps(done, indent=1))
            print(f"{result['arm']} lr={result['lr']} seed={result['seed']}: held-out {result['heldout_loss']:.4f}, "
                  f"test avg {result['accuracy']['average']:.4f}", flush=True)
    return done


def render(results, chosen, args, argv):
    fmt = common.format_bytes
    final = {arm: [r for r in results if r["arm"] == arm and r["lr"] == chosen[arm] and r["seed"] in args.seeds]
             for arm in args.arms}
    metric_names = [k for k in final[args.arms[0]][0]["accuracy"] if k != "average"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    rows = []
    for arm, runs in final.items():
        cells = [f"{100 * mean([r['accuracy'][m] for r in runs]):.1f}" for m in metric_names]
        averages = [100 * r["accuracy"]["average"] for r in runs]
        state = max(max(r["state_bytes"]) for r in runs)
        flat = all(len(set(r["state_bytes"][1:])) == 1 for r in runs)
        rows.append([arm, f"{chosen[arm]:g}", *cells, f"{mean(averages):.2f} ± {spread(averages):.2f}", fmt(state),
                     "yes" if flat else "no", fmt(mean([r["peak_bytes"] for r in runs])),
                     f"{mean([r['step_seconds'] for r in runs]) / mean([r['step_seconds'] for r in final['full']]):.2f}"
                     if "full" in final else "-"])
    grid = [[r["arm"], f"{r['lr']:g}", f"{r['heldout_loss']:.4f}", "chosen" if chosen[r["arm"]] == r["lr"] else ""]
            for r in sorted(results, key=lambda r: (r["arm"], r["lr"])) if r["seed"] == 0]
    avg = {arm: mean([100 * r["accuracy"]["average"] for r in runs]) for arm, runs in final.items()}
    state = {arm: max(max(r["state_bytes"]) for r in runs) for arm, runs in final.items()}
    targets = []
    if {"owlore", "lisa", "full"} <= set(avg):
        targets = [
            ["OwLore average >= LISA average", f"{avg['owlore']:.2f} vs {avg['lisa']:.2f}",
             "met" if avg["owlore"] >= avg["lisa"] else "missed"],
            ["OwLore within 1 point of full fine-tuning", f"{avg['owlore'] - avg['full']:+.2f}",
             "met" if avg["owlore"] >= avg["full"] - 1 else "missed"],
            ["OwLore optimizer state <= 25% of full fine-tuning's", f"{state['owlore'] / state['full']:.3f}",
             "met" if state["owlore"] <= 0.25 * state["full"] else "missed"],
            ["OwLore optimizer state flat across resamples", "every step after the first",
             "met" if all(len(set(r["state_bytes"][1:])) == 1 for r in final["owlore"]) else "missed"],
        ]
    markdown = "\n\n".join([
        f"# OwLore vs LISA vs GaLore vs full fine-tuning: {args.model}, {args.steps} steps x batch {args.batch}, "
        f"<= {args.seq} tokens, gamma {args.gamma} of 30 blocks, interval {args.interval}, rank {args.rank}",
        f"Command: `{common.command_line(NAME, argv)}`. Seeds {args.seeds}; lr chosen on seed 0 by held-out answer "
        f"NLL ({args.heldout} records of the training mix, never trained on); test: first {args.eval_per_task} "
        "items per shipped test set, answer log-likelihood. Accuracy in %, mean over seeds. Step time relative to "
        "full fine-tuning (runs two at a time: indicative).",
        common.markdown_table(["arm", "lr", *metric_names, "average ± sd", "max optimizer state", "state flat",
                               "peak RSS", "step time"], rows),
        "## Learning-rate selection (seed 0, held-out answer NLL)",
        common.markdown_table(["arm", "lr", "held-out NLL", ""], grid),
        "## Targets",
        common.markdown_table(["target", "measured", ""], targets) if targets else "(needs the full, lisa and "
                                                                                   "owlore arms)",
    ])
    figure, axes = common.new_figure(ncols=2, width=6.0)
    axes[0][0].bar(list(avg), list(avg.values()))
    axes[0][0].set(ylabel="test accuracy, average of 5 tasks (%)", title="accuracy (mean of seeds)")
    axes[0][0].set_ylim(min(avg.values()) - 3, max(avg.values()) + 2)
    for arm, runs in final.items():
        axes[0][1].plot([b / 1e6 for b in runs[0]["state_bytes"]], label=arm)
    axes[0][1].set(xlabel="step", ylabel="optimizer state (MB)", title="optimizer state across resamples")
    axes[0][1].legend()
    common.write_results(NAME, args.out_dir, markdown, figure)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    common.setup_environment(1)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    results_path = Path(args.out_dir) / f"{NAME}.json"
    grid = [(arm, lr, 0) for arm in args.arms for lr in LR_GRID[arm]]
    results = run_all(grid, args, results_path)
    chosen = {arm: min((r for r in results if r["arm"] == arm and r["seed"] == 0), key=lambda r: r["heldout_loss"])["lr"]
              for arm in args.arms}
    seeds = [(arm, chosen[arm], seed) for arm in args.arms for seed in args.seeds]
    results = run_all(seeds, args, results_path)
    render(results, chosen, args, argv)
    return results, chosen


if __name__ == "__main__":
    main()
