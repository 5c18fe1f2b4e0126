"""Peak memory of one whole training step (weights, gradients, optimizer state, activations, transients) per mode,
for LLaMA 1B and 7B shapes, through the real model and optimizer code, without allocating.

Estimator: the bf16 model and the optimizer are built under ``FakeTensorMode`` (tensors with shapes, dtypes and
storages but no data), one training step creates the optimizer state, and the next step (forward, backward,
``optimizer.step()``, ``zero_grad(set_to_none=True)``; layer-wise modes update inside backward) runs under a fresh
``torch.distributed._tools.mem_tracker.MemTracker``, which follows every storage as it is created and freed and
keeps the peak with its breakdown (a new tracker per measured step, so nothing of the first step is in it). The
step is not a refresh step (the SVD workspace of a refresh is not in the figure). Optimizer state is the bytes of
``optimizer.state`` (MemTracker also files the optimizer step's temporaries under it; they are counted here as
transients). For the 1B / 7B tables (a GPU) the 8-bit moments go through bitsandbytes' fused update, whose fake
implementation has no temporaries, as its CUDA kernel. On CPU, where bitsandbytes has no fused kernel, the 8-bit
inner optimizer dequantizes, steps and requantizes one slice at a time; the validation on this machine's CPU runs
that sliced code on the fake tensors, so the estimate sees its slice-sized temporaries too.

Validation: a small LLaMA is trained for real on this machine's CPU, once per mode, and the peak of the same step is
read from the PyTorch profiler's allocator events (``profile_memory=True``: every CPU allocation and free, in
order; peak = the most bytes live during the measured step, counting everything allocated since the model was
built; the 8-bit quantizer's constant tables, 2 x 64 KB kept for the process, are built before and left out of
both figures). The estimate must be within 10% of it.

    python benchmarks/training_memory.py                          # 1B and 7B, every mode; validation; ~15 min
    python benchmarks/training_memory.py --sizes 1B --modes galore --no-validate
"""
import argparse
import contextlib
import gc
import os
import sys
import time
from pathlib import Path


if __package__ in (None, ""):  # run as `python benchmarks/training_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR, PAPER_LLAMA, PAPER_VOCAB, build_llama, command_line, create_mode_optimizer, markdown_table,
    new_figure, setup_environment, write_results,
)


NAME = "training_memory"
TORCH_ADAMW = "torch AdamW"
DEFAULT_MODES = ["adamw", "adamw_8bit", "galore", "galore_8bit", "q_galore", "adamw+layerwise",
                 "adamw_8bit+layerwise", "galore+layerwise", "galore_8bit+layerwise", "q_galore+layerwise"]
# 1B: intermediate 5632 (TinyLlama's) instead of the paper's 5461, so Q-GaLore's INT8 groups of 256 divide it.
SIZES = {"1B": {**PAPER_LLAMA["1B"], "intermediate": 5632}, "7B": PAPER_LLAMA["7B"]}
CATEGORIES = ("weights", "gradients", "optimizer state", "activations", "transients")
VALIDATION_MODES = ["adamw", "galore", "galore_8bit", "galore+layerwise", "galore_8bit+layerwise", "q_galore"]
# Published figures (GaLore 2403.03507 §5.5, Fig. 1 and Table 11; Q-GaLore 2407.08296 / its README), GB.
PAPER_7B_GALORE_8BIT_LAYERWISE = 22.0
PAPER_7B_SAVINGS = {"vs BF16 Adam": 37.92, "vs 8-bit Adam": 24.5, "optimizer states (projection)": 9.6,
                    "gradients (per-layer update)": 13.5}
PAPER_1B_TABLE_11 = {"adamw": 13.60, "adamw+layerwise": 9.63, "adamw_8bit": 9.54, "adamw_8bit+layerwise": 6.93,
                     "galore_8bit": 7.95, "galore_8bit+layerwise": 5.63}
PAPER_7B_QGALORE = 15.08  # batch 1 (script comment); 15.26 at batch 16 with activation checkpointing (README)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES,
                        help=f"'{TORCH_ADAMW}' (fused) or hf_lowrank modes; '+layerwise' steps inside backward")
    parser.add_argument("--vocab", type=int, default=PAPER_VOCAB)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (quick tests)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--weight-group-size", type=int, default=256, help="q_galore: INT8 weight groups")
    parser.add_argument("--checkpointing-modes", nargs="*", default=None,
                        help="modes also estimated with activation checkpointing (default: all of --modes)")
    parser.add_argument("--name", default=NAME, help="output file name (benchmarks/results/NAME.md / .png)")
    val = parser.add_argument_group("validation against a real run on this machine (CPU)")
    val.add_argument("--no-validate", action="store_true")
    val.add_argument("--val-shape", type=int, nargs=5, default=[256, 768, 4, 4, 8000],
                     metavar=("HIDDEN", "INTERMEDIATE", "HEADS", "LAYERS", "VOCAB"))
    val.add_argument("--val-rank", type=int, default=64)
    val.add_argument("--val-modes", nargs="+", default=VALIDATION_MODES)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    return parser.parse_args(argv)


def build(shape: dict, vocab: int, seq: int, fake: bool):
    """A bf16 LLaMA built directly in bf16 (default dtype), as it would be for training; on fake tensors without
    running the weight initialisation (it has no values to fill, and it is most of the estimate's time)."""
    from transformers.initialization import no_init_weights

    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights() if fake else contextlib.nullcontext():
            model = build_llama(shape["hidden"], shape["intermediate"], shape["heads"], shape["layers"], vocab,
                                max_positions=max(seq, 128))
    finally:
        torch.set_default_dtype(torch.float32)
    model.train()
    return model


def make_optimizer(name: str, model, rank: int, weight_group_size: int):
    if name == TORCH_ADAMW:
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    mode, _, layerwise = name.partition("+")
    return create_mode_optimizer(model, mode, weight_group_size, rank=rank, update_proj_gap=10**6, lr=1e-3,
                                 layerwise=bool(layerwise))


def train_step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def setup(name, shape, args, checkpointing, vocab, fake):
    model = build(shape, vocab, args.seq, fake)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(name, model, shape["rank"], args.weight_group_size)
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    # The first step creates the optimizer state and fits the projectors; its gradients are zeros set directly
    # (a forward and backward pass would only cost time), and a layer-wise optimizer's own step is called.
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    getattr(optimizer, "optimizer", optimizer).step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, ids


@contextlib.contextmanager
def fused_8bit_update_on_cpu():
    """Run the 8-bit inner optimizer's fused (GPU) path on the fake CPU tensors, to estimate a GPU step."""
    from hf_lowrank.optim.inner import AdamW8bit

    original = AdamW8bit.fused_update_devices
    AdamW8bit.fused_update_devices = (*original, "cpu")
    try:
        yield
    finally:
        AdamW8bit.fused_update_devices = original


def nested_state_tensors(optimizer) -> list[torch.Tensor]:
    def walk(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from walk(item)

    return [t for state in optimizer.state.values() for key, value in state.items()
            if not isinstance(value, torch.Tensor) for t in walk(value)]


def estimate(name, shape, args, checkpointing, vocab=None, backend="cuda") -> dict:
    """Peak bytes of the second training step and its breakdown, on fake tensors (nothing allocated).
    ``backend``: whose 8-bit optimizer update to model, 'cuda' (fused, no temporaries) or 'cpu' (sliced)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from hf_lowrank.optim import optimizer_state_bytes

    with FakeTensorMode(), (fused_8bit_update_on_cpu() if backend == "cuda" else contextlib.nullcontext()):
        model, optimizer, ids = setup(name, shape, args, checkpointing, vocab or args.vocab, fake=True)
        tracker = MemTracker()
        # MemTracker finds an optimizer's top-level state tensors only; the projector tensors nested in
        # state[p]["projector"] are passed as well
        tracker.track_external(model, optimizer, *nested_state_tensors(optimizer))
        with tracker:
            train_step(model, optimizer, ids)
        if hasattr(optimizer, "remove_hooks"):
            optimizer.remove_hooks()
        state = optimizer_state_bytes(optimizer)
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    by_name = {str(getattr(key, "value", key)): value for key, value in snapshot.items()}
    weights = by_name.get("Parameter", 0) + by_name.get("Buffer", 0)
    result = {"peak": by_name["Total"], "weights": weights, "gradients": by_name.get("Gradient", 0),
              "optimizer state": state, "activations": by_name.get("Activation", 0)}
    result["transients"] = result["peak"] - sum(result[c] for c in CATEGORIES[:-1])
    return result


def measure(name, shape, args, checkpointing, vocab) -> int:
    """Peak bytes of the same step trained for real (CPU), from the profiler's allocation and free events."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from hf_lowrank.optim import get_mode
    from hf_lowrank.optim.inner import AdamW8bit

    if name != TORCH_ADAMW and get_mode(name.partition("+")[0]).inner == "adamw8bit":
        AdamW8bit().build_tables(torch.device("cpu"))  # process constants, not in the estimate either
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model, optimizer, ids = setup(name, shape, args, checkpointing, vocab, fake=False)
        with record_function("measured_step"):
            train_step(model, optimizer, ids)
        if hasattr(optimizer, "remove_hooks"):
            optimizer.remove_hooks()
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == "measured_step")
    changes = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for when, nbytes in changes:
        live += nbytes
        if window.start_ns() <= when <= window.end_ns():
            peak = max(peak, live)
    return peak


def gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f}"


def validate(args) -> tuple[list, bool]:
    hidden, intermediate, heads, layers, vocab = args.val_shape
    shape = dict(hidden=hidden, intermediate=intermediate, heads=heads, layers=layers, rank=args.val_rank)
    rows, within = [], True
    for name in args.val_modes:
        for checkpointing in (False, True):
            predicted = estimate(name, shape, args, checkpointing, vocab, backend="cpu")["peak"]
            real = measure(name, shape, args, checkpointing, vocab)
            error = predicted / real - 1.0
            within &= abs(error) <= 0.10
            rows.append([name, "yes" if checkpointing else "no", f"{predicted / 1e6:.2f}", f"{real / 1e6:.2f}",
                         f"{100 * error:+.1f}%"])
            print(f"validate {name} ckpt={checkpointing}: estimate {predicted / 1e6:.2f} MB, "
                  f"measured {real / 1e6:.2f} MB ({100 * error:+.1f}%)", flush=True)
    return rows, within


def comparison_lines(results) -> list[str]:
    """Our estimates beside the published 1B / 7B figures."""
    lines = []
    seven = {mode: results[("7B", mode, False)]["peak"] / 1e9 for mode in DEFAULT_MODES
             if ("7B", mode, False) in results}
    seven_ckpt = {mode: results[("7B", mode, True)]["peak"] / 1e9 for mode in DEFAULT_MODES
                  if ("7B", mode, True) in results}
    if "galore_8bit+layerwise" in seven:
        lines.append(f"- 7B, 8-bit GaLore layer-wise, 256 tokens, no checkpointing: "
                     f"{seven['galore_8bit+layerwise']:.2f} "
                     f"GB here vs {PAPER_7B_GALORE_8BIT_LAYERWISE} GB published (at <= 500 tokens per GPU).")
    full = seven.get("adamw")
    best = seven.get("galore_8bit+layerwise")
    if full and best and "adamw_8bit" in seven:
        lines.append(f"- 7B savings of 8-bit GaLore layer-wise: {full - best:.2f} GB vs BF16 AdamW (published "
                     f"{PAPER_7B_SAVINGS['vs BF16 Adam']}), {seven['adamw_8bit'] - best:.2f} GB vs 8-bit AdamW "
                     f"(published {PAPER_7B_SAVINGS['vs 8-bit Adam']}).")
    if ("7B", "adamw_8bit", False) in results and ("7B", "galore_8bit", False) in results:
        states = (results[("7B", "adamw_8bit", False)]["optimizer state"]
                  - results[("7B", "galore_8bit", False)]["optimizer state"]) / 1e9
        lines.append(f"- 7B optimizer state saved by the projection (8-bit AdamW -> 8-bit GaLore): {states:.2f} GB "
                     f"(published {PAPER_7B_SAVINGS['optimizer states (projection)']}).")
    if ("7B", "galore_8bit", False) in results and ("7B", "galore_8bit+layerwise", False) in results:
        grads = (results[("7B", "galore_8bit", False)]["gradients"]
                 - results[("7B", "galore_8bit+layerwise", False)]["gradients"]) / 1e9
        lines.append(f"- 7B gradients at the peak saved by the per-layer update: {grads:.2f} GB (published "
                     f"{PAPER_7B_SAVINGS['gradients (per-layer update)']}).")
    for label, ours in (("with", seven_ckpt.get("q_galore+layerwise")), ("without", seven.get("q_galore+layerwise"))):
        if ours:
            lines.append(f"- 7B Q-GaLore layer-wise, {label} activation checkpointing: {ours:.2f} GB here vs "
                         f"{PAPER_7B_QGALORE} GB published (batch 1).")
    one = {mode: results[("1B", mode, False)]["peak"] / 1e9 for mode in PAPER_1B_TABLE_11
           if ("1B", mode, False) in results}
    if one:
        lines.append("- 1B, 256 tokens (GaLore Table 11, measured on a GPU): " + "; ".join(
            f"{mode} {ours:.2f} GB here vs {PAPER_1B_TABLE_11[mode]} GB" for mode, ours in one.items()) + ".")
    return lines


def main(argv=None):
    args = parse_args(argv)
    setup_environment(threads=1)
    started, load = time.time(), os.getloadavg()
    results = {}
    for size in args.sizes:
        shape = {**SIZES[size], **({"layers": args.layers} if args.layers else {})}
        for checkpointing in (False, True):
            for name in args.modes if not checkpointing or args.checkpointing_modes is None else \
                    args.checkpointing_modes:
                results[(size, name, checkpointing)] = estimate(name, shape, args, checkpointing)
                print(f"{size} {name} ckpt={checkpointing}: {gb(results[(size, name, checkpointing)]['peak'])} GB",
                      flush=True)
    rows = [[size, name, "yes" if ckpt else "no", gb(r["peak"]), *(gb(r[c]) for c in CATEGORIES)]
            for (size, name, ckpt), r in results.items()]
    table = markdown_table(["size", "mode", "activation checkpointing", "peak (GB)",
                            *(f"{c} at peak (GB)" for c in CATEGORIES)], rows)
    sections = [
        "# Training-step peak memory per mode (estimated through the real code on fake tensors)", "",
        f"Command: `{command_line(NAME, argv)}`", "",
        f"LLaMA shapes of the GaLore paper (1B: hidden 2048, intermediate 5632, 24 layers; 7B: hidden 4096, "
        f"intermediate 11008, 32 layers), vocab {args.vocab}, untied embeddings, bf16 weights, micro-batch "
        f"{args.batch} x {args.seq} tokens, GaLore rank 512 (1B) / 1024 (7B) on attention + MLP linears, "
        f"Q-GaLore INT8 weights in groups of {args.weight_group_size}. Peak of one regular (no-refresh) step after "
        f"the first; GB = 1e9 bytes. `{TORCH_ADAMW}` is torch.optim.AdamW(fused=True); `adamw` / `adamw_8bit` are "
        f"this library's full-rank modes. Breakdown: what is live at the peak (MemTracker's categories: weights = "
        f"parameters + buffers, e.g. Q-GaLore's INT8 weights; optimizer state = the bytes of optimizer.state; "
        f"transients = the rest: temporaries of backward and of the optimizer step). Not included: the CUDA "
        f"context and the caching allocator's reserve / fragmentation.", "",
        table, "",
    ]
    if not args.no_validate:
        val_rows, within = validate(args)
        hidden, intermediate, heads, layers, vocab = args.val_shape
        sections += [
            "## Validation: estimate vs a real run on this machine", "",
            f"LLaMA hidden {hidden}, intermediate {intermediate}, {heads} heads, {layers} layers, vocab {vocab}, "
            f"bf16, {args.batch} x {args.seq} tokens, rank {args.val_rank}, CPU. Measured: the PyTorch profiler's CPU "
            f"allocator events (profile_memory=True), peak bytes live during the measured step, counting everything "
            f"allocated since the model was built (the 8-bit quantizer's constant tables, 2 x 64 KB built before the "
            f"model and kept for the process, are in neither figure).", "",
            markdown_table(["mode", "activation checkpointing", "estimate (MB)", "measured (MB)", "difference"],
                           val_rows), "",
            f"Target: every estimate within 10% of the measured peak: {'met' if within else 'MISSED'}.", "",
        ]
    comparisons = comparison_lines(results)
    if comparisons:
        sections += ["## Published figures", "", *comparisons, ""]
    sections += [f"Load average (1 / 5 / 15 min) at start: {' / '.join(f'{x:.2f}' for x in load)}; "
                 f"run time {time.time() - started:.0f} s."]

    figure, axes = new_figure(ncols=len(args.sizes), width=6.5, height=5)
    for ax, size in zip(axes[0], args.sizes):
        names = [(name, ckpt) for (s, name, ckpt) in results if s == size]
        labels = [f"{name}{' +ckpt' if ckpt else ''}" for name, ckpt in names]
        left = [0.0] * len(names)
        for category in CATEGORIES:
            values = [results[(size, name, ckpt)][category] / 1e9 for name, ckpt in names]
            ax.barh(labels, values, left=left, label=category)
            left = [a + b for a, b in zip(left, values)]
        ax.set_xlabel("GB at the step's peak")
        ax.set_title(f"LLaMA {size}, {args.batch} x {args.seq} tokens, bf16")
        ax.invert_yaxis()
        ax.legend(loc="lower right", fontsize=7)
    write_results(args.name, args.out_dir, "\n".join(sections), figure)
    return {"estimates": results, **({"validation": val_rows, "within": within} if not args.no_validate else {})}


if __name__ == "__main__":
    main()
