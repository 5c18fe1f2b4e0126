"""OWL outlier ratios per block of SmolLM2-135M, and the block-sampling probabilities OwLore draws from them.

    python benchmarks/owlore_ratios.py [--batches 8 --batch 4 --seq 128 --m 5 13]

Calibration text: the first ``batches x batch`` prompts of the shipped commonsense training mix
(``data/commonsense/train_mix.json``, LLM-Adapters' Alpaca template), truncated to ``seq`` tokens. For each ``M``
the table gives every block's ratio (share of |W_ij| * ||X_j|| scores above M x the block mean) and its OwLore
sampling probability; the plot shows both against LISA's uniform 1/L. The ratios are also written as JSON for
``outlier_ratios=`` of the recipes.
"""
import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from benchmarks import common  # noqa: E402


NAME = "owlore_ratios"


def calibration_batches(tokenizer, batches: int, batch: int, seq: int):
    import commonsense

    records = commonsense.read_records(commonsense.SHIPPED_TRAIN)[: batches * batch]
    texts = [commonsense.alpaca_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in records]
    out = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start: start + batch], return_tensors="pt", padding=True, truncation=True,
                            max_length=seq)
        out.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--m", type=float, nargs="+", default=[5.0, 13.0], help="OWL outlier multiples")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out-dir", default=str(common.DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    common.setup_environment(2)
    import models

    from hf_lowrank.owlore import block_probabilities, compute_outlier_ratios, save_ratios

    model, tokenizer = models.load_causal_lm(args.model, dtype=torch.float32)
    batches = calibration_batches(tokenizer, args.batches, args.batch, args.seq)
    results = {m: compute_outlier_ratios(model, batches, M=m) for m in args.m}
    blocks = len(next(iter(results.values())))
    rows = []
    for index in range(blocks):
        row = [index]
        for m, ratios in results.items():
            row += [f"{100 * ratios[index]:.3f}", f"{block_probabilities('owl', blocks, ratios)[index]:.4f}"]
        rows.append(row)
    headers = ["block"] + [h for m in results for h in (f"ratio % (M={m:g})", f"p owl (M={m:g})")]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for m, ratios in results.items():
        save_ratios(out_dir / f"{NAME}_M{m:g}.json", ratios, model_name=args.model, M=m)
    summary = []
    for m, ratios in results.items():
        p = block_probabilities("owl", blocks, ratios)
        summary.append(f"M={m:g}: max/min probability {p.max() / p.min():.1f}x, most likely blocks "
                       f"{sorted(range(blocks), key=lambda i: -p[i])[:5]}, uniform 1/L = {1 / blocks:.4f}")
    markdown = "\n\n".join([
        f"# OWL outlier ratios per block: {args.model}, {blocks} blocks",
        f"Command: `{common.command_line(NAME, argv)}`. Calibration: {args.batches} x {args.batch} prompts of the "
        f"shipped commonsense training mix, <= {args.seq} tokens each.",
        "\n".join(f"- {line}" for line in summary),
        common.markdown_table(headers, rows),
    ])
    figure, axes = common.new_figure(ncols=2, width=6.0)
    for m, ratios in results.items():
        axes[0][0].plot(range(blocks), [100 * r for r in ratios], marker="o", label=f"M={m:g}")
        axes[0][1].plot(range(blocks), block_probabilities("owl", blocks, ratios), marker="o", label=f"M={m:g}")
    axes[0][1].axhline(1 / blocks, color="k", ls="--", label="LISA (uniform)")
    axes[0][0].set(xlabel="block", ylabel="outlier ratio (%)", title="OWL outlier ratio")
    axes[0][1].set(xlabel="block", ylabel="sampling probability", title="OwLore block probabilities")
    for ax in axes[0]:
        ax.legend()
    common.write_results(NAME, out_dir, markdown, figure)
    return results


if __name__ == "__main__":
    main()
