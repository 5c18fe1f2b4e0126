"""Step time and peak memory of one training step per mode on a device (the GPU check's benchmark).

Each mode trains its own copy of a bf16 LLaMA of the chosen shape (default: the GaLore paper's 1B) on one fixed
batch; after ``--warmup`` steps, ``--steps`` steps are timed (``torch.cuda.synchronize`` around each on CUDA) and
the peak memory of the timed steps is read (``torch.cuda.max_memory_allocated`` on CUDA; peak RSS on CPU). Runs
are sequential, one model alive at a time, so each peak is that mode's own. Ratios are to torch AdamW
(``fused=True``); bitsandbytes' ``AdamW8bit`` is the 8-bit baseline. The host syncs of one more step are counted
(``hf_lowrank.optim.syncs.HostSyncCounter``; layer-wise updates run inside backward, so the whole step is counted).
``--estimate NAME ...`` also runs ``benchmarks/training_memory.py``'s fake-tensor estimator for those rows (GPU
kernel semantics) and prints it beside the measured peak: the estimator's check on a real GPU.

    python benchmarks/device_step.py --device cuda                    # LLaMA-1B shape, about 2 minutes
    python benchmarks/device_step.py --device cpu --layers 1 --hidden 256 --intermediate 688   # smoke
"""
import argparse
import gc
import sys
import time
from pathlib import Path


if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hf_lowrank.optim.syncs import HostSyncCounter  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR, PAPER_LLAMA, build_llama, command_line, create_mode_optimizer, format_bytes, markdown_table,
    median, new_figure, reset_peak_rss, rss_kb, setup_environment, write_results,
)


NAME = "device_step"
MODES = ["galore", "galore_8bit", "galore_subspace", "q_galore"]
TORCH_ADAMW = "torch AdamW"
BNB_ADAMW8BIT = "bitsandbytes AdamW8bit"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = PAPER_LLAMA["1B"]
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=cfg["hidden"])
    parser.add_argument("--intermediate", type=int, default=5632, help="1B: 5632 so groups of 256 divide it")
    parser.add_argument("--heads", type=int, default=cfg["heads"])
    parser.add_argument("--layers", type=int, default=cfg["layers"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=cfg["rank"])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--weight-group-size", type=int, default=256, help="q_galore: INT8 weight groups")
    parser.add_argument("--estimate", nargs="*", default=[], metavar="NAME",
                        help="rows (e.g. 'galore_8bit+layerwise') to also size with the fake-tensor estimator")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    return parser.parse_args(argv)


def run(name, args, device):
    model = build_llama(args.hidden, args.intermediate, args.heads, args.layers, args.vocab, device=device,
                        max_positions=max(args.seq, 128)).to(torch.bfloat16)
    if name == TORCH_ADAMW:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    elif name == BNB_ADAMW8BIT:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    else:
        mode, _, layerwise = name.partition("+")
        optimizer = create_mode_optimizer(model, mode, args.weight_group_size, rank=args.rank, update_proj_gap=10**6, lr=1e-3,
                                          layerwise=bool(layerwise))
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    times = []
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kb("VmHWM") * 1024
    with HostSyncCounter() as syncs:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step": median(times[args.warmup:]), "peak": peak, "syncs": syncs.total}


def estimate_peak(name, args) -> int:
    """The fake-tensor estimate (``benchmarks/training_memory.py``) of the same step's peak."""
    from benchmarks import training_memory

    shape = dict(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, layers=args.layers,
                 rank=args.rank)
    options = training_memory.parse_args(["--seq", str(args.seq), "--batch", str(args.batch),
                                          "--weight-group-size", str(args.weight_group_size)])
    return training_memory.estimate(name, shape, options, checkpointing=False, vocab=args.vocab)["peak"]


def main(argv=None):
    args = parse_args(argv)
    setup_environment(threads=torch.get_num_threads())
    device = torch.device(args.device)
    names = [TORCH_ADAMW, BNB_ADAMW8BIT] + [m + suffix for m in args.modes for suffix in ("", "+layerwise")]
    results = {}
    for name in names:
        results[name] = run(name, args, device)
        print(f"{name}: {results[name]['step']:.3f} s/step, peak {format_bytes(results[name]['peak'])}", flush=True)
    estimates = {name: estimate_peak(name, args) for name in args.estimate}
    base = results[TORCH_ADAMW]
    rows = [[name, f"{r['step'] / base['step']:.3f}", format_bytes(r["peak"]), f"{r['peak'] / base['peak']:.3f}",
             format_bytes(estimates[name]) if name in estimates else "-",
             f"{100 * (estimates[name] / r['peak'] - 1):+.1f}%" if name in estimates else "-", r["syncs"]]
            for name, r in results.items()]
    markdown = "\n".join([
        f"# One training step on {device.type}: time and peak memory per mode", "",
        f"Command: `{command_line(NAME, argv)}`", "",
        f"LLaMA hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}, bf16, "
        f"batch {args.batch} x {args.seq}, rank {args.rank}, no refresh in the timed steps (gap 1e6); median of "
        f"{args.steps} steps after {args.warmup}.", "",
        markdown_table(["mode", "step time x torch AdamW", "peak memory", "x torch AdamW", "estimated peak",
                        "estimate vs measured", "host syncs per step"], rows),
    ])
    figure, axes = new_figure(ncols=2, width=5)
    axes[0, 0].barh(list(results), [r["step"] / base["step"] for r in results.values()])
    axes[0, 0].set_xlabel("step time / torch AdamW")
    axes[0, 1].barh(list(results), [r["peak"] / 1e9 for r in results.values()])
    axes[0, 1].set_xlabel("peak memory (GB)")
    write_results(f"{NAME}_{device.type}", args.out_dir, markdown, figure)


if __name__ == "__main__":
    main()
