"""Optimizer-state bytes per mode for the GaLore paper's LLaMA 60M ... 7B, through the real optimizer code.

Each model is built on the ``meta`` device (no parameter memory), the optimizer is created exactly as a user
would (``create_optimizer``), and ``optimizer.init_state()`` allocates every state tensor the first step
would allocate, as meta tensors of the true shapes and dtypes (projectors are fitted to a meta gradient, so
their stored tensors have their real sizes too). ``optimizer_state_bytes`` then counts them. The full-rank
baseline is ``torch.optim.AdamW`` itself, stepped once on meta gradients. No size is typed in by hand.

What is counted: every tensor in ``optimizer.state`` -- moments (or 8-bit codes + block scales, or Adafactor's
factored rows/columns), step counters, and the projector state a checkpoint carries (SVD basis, DCT indices,
seed). Embeddings, norms and lm_head are in the optimizer too (full-rank inner optimizer), as in the paper.
Not counted in "state" but reported beside it: the DCT matrix each projector size shares (a cache).

    python benchmarks/optimizer_memory.py                       # all sizes, under a minute
    python benchmarks/optimizer_memory.py --sizes 1B --dtype bfloat16
"""
import argparse
import sys
from pathlib import Path


if __package__ in (None, ""):  # run as `python benchmarks/optimizer_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR, PAPER_LLAMA, PAPER_TARGET_MODULES, PAPER_VOCAB, build_llama, command_line, format_bytes,
    markdown_table, new_figure, parse_mode, projected_weights, setup_environment, write_results,
)


NAME = "optimizer_memory"
TORCH_ADAMW = "torch AdamW"
DEFAULT_MODES = ["adamw", "adamw_8bit", "galore", "galore_8bit", "galore_adafactor", "galore_randomized",
                 "galore_dct", "galore_dct_8bit", "frugal", "galore:quant_bits=4", "galore_8bit:quant_bits=4"]
# GaLore Table 6b: optimizer state (BF16) of full-rank Adam vs GaLore, GB.
PAPER_TABLE_6B = {"60M": (0.23, 0.13), "130M": (0.51, 0.28), "350M": (1.37, 0.54), "1B": (5.20, 1.78)}
TARGET_SIZE = "1B"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(PAPER_LLAMA), choices=list(PAPER_LLAMA))
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES,
                        help="hf_lowrank modes to size; 'mode:key=value,...' adds options (e.g. galore:quant_bits=4, "
                             "Q-GaLore's INT4 projector storage)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    parser.add_argument("--vocab", type=int, default=PAPER_VOCAB)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (for quick tests)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    return parser.parse_args(argv)


def meta_model(size: str, args):
    cfg = PAPER_LLAMA[size]
    model = build_llama(cfg["hidden"], cfg["intermediate"], cfg["heads"], args.layers or cfg["layers"], args.vocab,
                        device="meta")
    return model.to(getattr(torch, args.dtype))


def torch_adamw_state_bytes(model) -> tuple[int, int]:
    """Bytes of ``torch.optim.AdamW``'s state after one step on meta gradients (its state is lazy): in total, and
    for the weights GaLore projects."""
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    sizes = {p: sum(tensor_bytes(t) for t in state.values()) for p, state in optimizer.state.items()}
    return sum(sizes.values()), sum(sizes[p] for p in projected_weights(model))


def tensor_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def mode_state(model, spec: str, rank: int) -> dict:
    """Total state bytes, the projectors' share, and the shared DCT caches of mode ``spec`` on ``model``."""
    from hf_lowrank.optim import create_optimizer, optimizer_state_bytes
    from hf_lowrank.projectors import dct_matrix, resolve_side

    mode, options = parse_mode(spec)
    optimizer = create_optimizer(model, mode, target_modules=PAPER_TARGET_MODULES, rank=rank, update_proj_gap=200,
                                 scale=0.25, lr=1e-2, **options)
    optimizer.init_state()
    projector_bytes = sum(tensor_bytes(state.get("projector", {})) for state in optimizer.state.values())
    cache_bytes = 0
    if any(group.get("projector") == "dct" for group in optimizer.param_groups):
        dims = {p.shape[0] if resolve_side(tuple(p.shape), group["proj_type"]) == "left" else p.shape[1]
                for group in optimizer.param_groups if "rank" in group for p in group["params"]}
        cache_bytes = sum(tensor_bytes(dct_matrix(dim, "meta")) for dim in dims)
    return {"total": optimizer_state_bytes(optimizer), "projectors": projector_bytes, "cache": cache_bytes}


def measure(args) -> dict:
    results = {}
    for size in args.sizes:
        model = meta_model(size, args)
        rank = PAPER_LLAMA[size]["rank"]
        adamw_total, adamw_projected = torch_adamw_state_bytes(model)
        row = {TORCH_ADAMW: {"total": adamw_total, "projectors": 0, "cache": 0}}
        for mode in args.modes:
            row[mode] = mode_state(model, mode, rank)
        results[size] = {"rank": rank, "params": sum(p.numel() for p in model.parameters()), "modes": row,
                         "projected_share": adamw_projected / adamw_total}
        print(f"sized LLaMA {size} (rank {rank})", flush=True)
    return results


def reduction(state: int, baseline: int) -> float:
    return 1.0 - state / baseline


def main(argv=None):
    args = parse_args(argv)
    setup_environment(threads=1)
    results = measure(args)
    sizes = list(results)
    names = list(results[sizes[0]]["modes"])

    overview_rows = []
    for name in names:
        cells = []
        for size in sizes:
            entry, base = results[size]["modes"][name], results[size]["modes"][TORCH_ADAMW]["total"]
            cells.append(f"{format_bytes(entry['total'])} ({-reduction(entry['total'], base):+.1%})")
        overview_rows.append([name, *cells])
    overview = markdown_table(
        ["optimizer", *[f"LLaMA {s} (r={results[s]['rank']}, {results[s]['params'] / 1e6:,.0f}M params)"
                        for s in sizes]], overview_rows)

    sections = [
        f"# Optimizer state of the GaLore paper's LLaMA models ({args.dtype} parameters)",
        "",
        f"Command: `{command_line(NAME, argv)}`",
        "",
        "Sizes come from the real optimizer code on meta tensors (`create_optimizer(...)` + `init_state()` + "
        "`optimizer_state_bytes`; the baseline is `torch.optim.AdamW` stepped once on meta gradients). Projection "
        "on attention + MLP linears (GaLore's targets), paper ranks, vocab "
        f"{args.vocab}; embeddings, norms and lm_head are in the same optimizer, full-rank. In brackets: change "
        "vs torch AdamW's state.",
        "",
        overview,
    ]

    targets = []
    if TARGET_SIZE in results:
        detail = results[TARGET_SIZE]["modes"]
        base = detail[TORCH_ADAMW]["total"]
        detail_rows = [[name, format_bytes(e["total"]), format_bytes(e["projectors"]),
                        format_bytes(e["total"] - e["projectors"]), f"{reduction(e['total'], base):.1%}",
                        f"{reduction(e['total'] - e['projectors'], base):.1%}",
                        format_bytes(e["cache"]) if e["cache"] else "-"]
                       for name, e in detail.items()]
        sections += [
            "",
            f"## LLaMA {TARGET_SIZE}, rank {results[TARGET_SIZE]['rank']}: where the bytes are",
            "",
            markdown_table(["optimizer", "state", "of which projectors", "moments etc.", "reduction",
                            "reduction without projectors", "shared DCT cache (not state)"], detail_rows),
        ]
        paper_full, paper_galore = PAPER_TABLE_6B[TARGET_SIZE]
        paper_reduction = 1 - paper_galore / paper_full
        if "galore" in detail:
            ours = reduction(detail["galore"]["total"], base)
            points, relative = paper_reduction - ours, abs(ours - paper_reduction) / paper_reduction
            verdict = "met" if relative <= 0.05 else "MISSED"
            if verdict == "MISSED" and abs(points) <= 0.05:
                verdict = "met as percentage points, MISSED as a relative difference"
            without = reduction(detail["galore"]["total"] - detail["galore"]["projectors"], base)
            targets.append(
                f"- `galore` (fp32 SVD projectors included): {ours:.1%} smaller vs the paper's {paper_reduction:.1%} "
                f"(5.20 GB -> 1.78 GB): {points * 100:.1f} percentage points, {relative:.1%} relative (target within "
                f"5%: {verdict}). Without projectors: {without:.1%}.")
            int4 = "galore:quant_bits=4"
            if int4 in detail:
                ours = reduction(detail[int4]["total"], base)
                relative = abs(ours - paper_reduction) / paper_reduction
                verdict = "met" if relative <= 0.05 else "MISSED"
                targets.append(f"- `galore` with INT4 projector storage (`quant_bits=4`, Q-GaLore's): {ours:.1%} "
                               f"smaller, {relative:.1%} relative to the paper ({verdict})")
        if "galore_8bit" in detail and args.dtype == "float32":
            ours = reduction(detail["galore_8bit"]["total"], base)
            targets.append(f"- `galore_8bit`: {ours:.1%} smaller than fp32 AdamW (target >= 85%: "
                           f"{'met' if ours >= 0.85 else 'MISSED'})")
        if "galore" in detail and "galore_dct" in detail:
            share = detail["galore_dct"]["projectors"] / detail["galore"]["projectors"]
            targets.append(f"- `galore_dct` projector state: {format_bytes(detail['galore_dct']['projectors'])} = "
                           f"{share:.3%} of `galore`'s {format_bytes(detail['galore']['projectors'])} (target <= 1%: "
                           f"{'met' if share <= 0.01 else 'MISSED'}); the shared DCT matrices it reads add "
                           f"{format_bytes(detail['galore_dct']['cache'])} once per process (not optimizer state)")
        if "galore_dct_8bit" in detail:
            ours = reduction(detail["galore_dct_8bit"]["total"], base)
            targets.append(f"- `galore_dct_8bit` (DCT + 8-bit): {ours:.1%} smaller than AdamW (target >= 90%: "
                           f"{'met' if ours >= 0.9 else 'MISSED'})")
        best = min((n for n in detail if n != TORCH_ADAMW), key=lambda n: detail[n]["total"])
        ours = reduction(detail[best]["total"], base)
        targets.append(f"- best combination `{best}`: {ours:.1%} smaller than AdamW (target >= 90%: "
                       f"{'met' if ours >= 0.9 else 'MISSED'})")

    paper_rows = []
    for size in sizes:
        if size in PAPER_TABLE_6B and "galore" in results[size]["modes"]:
            modes = results[size]["modes"]
            base, galore = modes[TORCH_ADAMW]["total"], modes["galore"]
            paper_full, paper_galore = PAPER_TABLE_6B[size]
            paper = f"{paper_full:.2f} -> {paper_galore:.2f} GB ({1 - paper_galore / paper_full:.1%})"
            paper_rows.append([size, paper, f"{format_bytes(base)} -> {format_bytes(galore['total'])} "
                               f"({reduction(galore['total'], base):.1%})",
                               f"{reduction(galore['total'] - galore['projectors'], base):.1%}",
                               f"{results[size]['projected_share']:.1%}"])
    if paper_rows:
        sections += [
            "",
            "## `galore` vs the paper (GaLore Table 6b, BF16 state)",
            "",
            markdown_table(["model", "paper: Adam -> GaLore", f"ours ({args.dtype}): AdamW -> galore",
                            "ours without projectors", "ceiling: projected weights' share of AdamW state"],
                           paper_rows),
            "",
            "The ceiling is the reduction if the projected layers kept no state at all. The paper's 60M figure "
            "equals it (43.5% vs 43.6%), so Table 6b counts no low-rank moments or projectors there, unlike at "
            "350M/1B; its full-rank figures also differ from 4 bytes x parameters (1B: 1,339M parameters -> "
            "5.36 GB, paper 5.20). Table 6b is thus not one consistent count: compare reductions, not bytes. Our "
            "projectors are fp32 (galore-torch stores them in the gradient's dtype); with fp32 moments this gives "
            "the same ratios as all-BF16 state.",
        ]
    if targets:
        sections += ["", "## Targets (LLaMA 1B, rank 512)", "", *targets]
    markdown = "\n".join(sections)

    fig, axes = new_figure(1, width=9.0, height=4.5)
    ax = axes[0, 0]
    width = 0.8 / len(names)
    colors = matplotlib.colormaps["tab20"]
    for i, name in enumerate(names):
        values = [results[s]["modes"][name]["total"] / 1e9 for s in sizes]
        ax.bar([x + i * width for x in range(len(sizes))], values, width, label=name, color=colors(i % 20))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(sizes))], [f"LLaMA {s}" for s in sizes])
    ax.set_yscale("log")
    ax.set_ylabel(f"optimizer state, GB ({args.dtype} parameters)")
    ax.legend(fontsize=7, ncol=2)
    write_results(NAME, args.out_dir, markdown, fig)
    return results


if __name__ == "__main__":
    main()
