"""Step time of every optimizer mode on a tiny LLaMA (CPU), as ratios to ``torch.optim.AdamW``.

Every candidate (torch AdamW: for-loop, ``foreach=True`` and ``fused=True``; bitsandbytes' ``AdamW8bit``;
galore-torch's ``GaLoreAdamW``; each ``hf_lowrank`` mode) trains its own copy of the same model on the same batch;
one round steps every candidate once, round-robin (ABAB..., the starting candidate rotating), so noise from other
processes on the shared cores hits all of them alike; ratios are of medians. Forward+backward and the optimizer
step are timed separately. The load average is recorded before and after, and the host syncs of one regular
optimizer step of each candidate are counted (``hf_lowrank.optim.syncs.HostSyncCounter``).

Projector refreshes happen every ``--gap-run`` steps while timing (default 10, so a short run sees several);
the cost per step at the real gap ``--gap`` (default 200) is then amortized from the medians of regular and
refresh steps: ``t(T) = t_regular + (t_refresh - t_regular) / T``.

A second part times one projector refresh for a LLaMA-1B MLP matrix (2048 x 5461 fp32, rank 512) per
projector (exact SVD, randomized SVD, DCT, random, warm-started subspace iteration) and galore-torch's own SVD
projector.

    python benchmarks/step_time.py                   # defaults: a few minutes on 1 thread
    python benchmarks/step_time.py --rounds 60 --threads 2 --batch 16
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path


if __package__ in (None, ""):  # run as `python benchmarks/step_time.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT_DIR, build_llama, command_line, create_mode_optimizer, galore_torch_param_groups,
    interleaved_times, markdown_table, median, new_figure, setup_environment, write_results,
)


NAME = "step_time"
TORCH_ADAMW = "torch AdamW"
TORCH_ADAMW_FOREACH = "torch AdamW foreach"
TORCH_ADAMW_FUSED = "torch AdamW fused"
BNB_ADAMW8BIT = "bitsandbytes AdamW8bit"
GALORE_TORCH = "galore-torch GaLoreAdamW"
DEFAULT_MODES = ["adamw", "galore", "galore_8bit", "galore_adafactor", "galore_randomized", "galore_dct",
                 "frugal"]
FULL_RANK = (TORCH_ADAMW, TORCH_ADAMW_FOREACH, TORCH_ADAMW_FUSED, BNB_ADAMW8BIT, "adamw")
PROJECTORS = ["svd", "randomized", "dct", "random", "subspace"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model and batch (layer sizes: multiples of 64)")
    model.add_argument("--hidden", type=int, default=256)
    model.add_argument("--intermediate", type=int, default=704)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--vocab", type=int, default=8192)
    model.add_argument("--batch", type=int, default=8)
    model.add_argument("--seq", type=int, default=128)
    opt = parser.add_argument_group("optimizers")
    opt.add_argument("--modes", nargs="*", default=DEFAULT_MODES,
                     help="hf_lowrank modes to time; 'mode:key=value,...' adds options")
    opt.add_argument("--weight-group-size", type=int, default=64,
                     help="q_galore: INT8 weight groups (must divide every targeted input dimension)")
    opt.add_argument("--rank", type=int, default=64, help="GaLore rank (paper ratio rank/hidden = 1/4)")
    opt.add_argument("--gap", type=int, default=200, help="update_proj_gap the amortized figures are for")
    opt.add_argument("--gap-run", type=int, default=10, help="update_proj_gap used while timing")
    opt.add_argument("--no-galore-torch", action="store_true", help="skip galore-torch's GaLoreAdamW")
    opt.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes' AdamW8bit")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--rounds", type=int, default=30, help="timed rounds (each steps every candidate once)")
    timing.add_argument("--warmup", type=int, default=2)
    timing.add_argument("--threads", type=int, default=1)
    refresh = parser.add_argument_group("projector refresh")
    refresh.add_argument("--refresh-shape", type=int, nargs=2, default=[2048, 5461])
    refresh.add_argument("--refresh-rank", type=int, default=512)
    refresh.add_argument("--refresh-repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    if args.gap_run < 2 or args.rounds < 1:
        parser.error("--gap-run must be >= 2 and --rounds >= 1 (regular and refresh steps are both needed).")
    return args


def make_candidates(args):
    """``{name: optimizer factory(model)}`` for the baselines and every requested ``hf_lowrank`` mode."""
    candidates = {
        TORCH_ADAMW: lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False),
        TORCH_ADAMW_FOREACH: lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
        TORCH_ADAMW_FUSED: lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
    }
    if not args.no_bnb:
        import bitsandbytes as bnb

        candidates[BNB_ADAMW8BIT] = lambda model: bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    if not args.no_galore_torch:
        from galore_torch import GaLoreAdamW

        candidates[GALORE_TORCH] = lambda model: GaLoreAdamW(
            galore_torch_param_groups(model, args.rank, args.gap_run, 0.25), lr=1e-2, eps=1e-8,
            no_deprecation_warning=True)
    for mode in args.modes:
        candidates[mode] = lambda model, mode=mode: create_mode_optimizer(
            model, mode, args.weight_group_size, rank=args.rank, update_proj_gap=args.gap_run, scale=0.25, lr=1e-2)
    return candidates


def train_step_fn(model, optimizer, batch):
    """One training step that returns its forward+backward and optimizer-step times."""
    def step():
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        return {"fwd_bwd": middle - start, "opt": time.perf_counter() - middle}

    return step


def time_train_steps(args):
    base = build_llama(args.hidden, args.intermediate, args.heads, args.layers, args.vocab,
                       max_positions=max(args.seq, 128))
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    steps, optimizers = {}, {}
    for name, factory in make_candidates(args).items():
        model = copy.deepcopy(base)
        optimizers[name] = factory(model)
        steps[name] = train_step_fn(model, optimizers[name], batch)
    load = [os.getloadavg()]
    records = interleaved_times(steps, repeats=args.rounds, warmup=args.warmup, progress="train steps")
    load.append(os.getloadavg())
    # The optimizer-step counter equals the round index (warmup rounds included); refreshes at multiples of gap.
    refresh_round = [(args.warmup + i) % args.gap_run == 0 for i in range(args.rounds)]
    summary = {}
    for name, rounds in records.items():
        if name in FULL_RANK:  # no projector: every step is a regular step
            summary[name] = {"regular": medians(rounds), "refresh": None}
        else:
            summary[name] = {
                "regular": medians([r for r, refresh in zip(rounds, refresh_round) if not refresh]),
                "refresh": medians([r for r, refresh in zip(rounds, refresh_round) if refresh]),
            }
    return summary, count_host_syncs(steps, optimizers, args), load


def count_host_syncs(steps, optimizers, args):
    """Host syncs in one regular (no refresh) optimizer step of each candidate."""
    from hf_lowrank.optim.syncs import HostSyncCounter

    if (args.warmup + args.rounds) % args.gap_run == 0:  # the next step would refresh: take it untimed first
        for step in steps.values():
            step()
    counts = {}
    for name, optimizer in optimizers.items():
        original = optimizer.step

        def counted_step(*a, _original=original, **kw):
            with HostSyncCounter() as counter:
                result = _original(*a, **kw)
            counts[name] = counter.counts
            return result

        optimizer.step = counted_step
        steps[name]()
        optimizer.step = original
    return counts


def medians(rounds):
    return {part: median([r[part] for r in rounds]) for part in ("fwd_bwd", "opt")} if rounds else None


def amortized(split, part, gap):
    regular = split["regular"][part]
    refresh = split["refresh"][part] if split["refresh"] else regular
    return regular + (refresh - regular) / gap


def time_projector_refresh(args):
    from galore_torch.galore_projector import GaLoreProjector

    from hf_lowrank.projectors import get_projector

    shape, rank = tuple(args.refresh_shape), args.refresh_rank
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    projectors = {name: get_projector(name, shape, rank, "std") for name in PROJECTORS}
    projectors["subspace"].update(grad)  # timed refreshes are warm-started ones (its first fit is an exact SVD)
    fns = {name: (lambda p=p: p.update(grad)) for name, p in projectors.items()}
    reference = GaLoreProjector(rank, update_proj_gap=1, proj_type="std")

    def galore_torch_refresh():
        reference.project(grad, 0)  # step 0 of a projector always refreshes

    fns["galore-torch (svd)"] = galore_torch_refresh
    times = interleaved_times(fns, repeats=args.refresh_repeats, warmup=0, progress="projector refresh")
    state_bytes = {name: p.state_bytes() for name, p in projectors.items()}
    return {name: median([r["total"] for r in rounds]) for name, rounds in times.items()}, state_bytes


def format_syncs(counts):
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "-"


def format_load(load):
    return " / ".join(f"{x:.2f}" for x in load)


def main(argv=None):
    args = parse_args(argv)
    setup_environment(args.threads)
    summary, syncs, load = time_train_steps(args)
    refresh_times, refresh_state = time_projector_refresh(args)

    base = summary[TORCH_ADAMW]
    base_full = base["regular"]["fwd_bwd"] + base["regular"]["opt"]
    base_opt = base["regular"]["opt"]
    measured = {n: amortized(s, "fwd_bwd", args.gap) + amortized(s, "opt", args.gap) for n, s in summary.items()}
    opt = {n: amortized(s, "opt", args.gap) for n, s in summary.items()}
    # Forward+backward is the same computation for every candidate: its median over all candidates is the least
    # noisy estimate, so the full step is that plus each candidate's own (amortized) optimizer step.
    fwd_bwd = median([s["regular"]["fwd_bwd"] for s in summary.values()])
    full = {n: (fwd_bwd + opt[n]) / (fwd_bwd + base_opt) for n in summary}
    rows = []
    for name, split in summary.items():
        refresh_extra = (f"{(split['refresh']['opt'] - split['regular']['opt']) / base_full:.2f}"
                         if split["refresh"] else "-")
        vs_galore_torch = f"{full[name] / full[GALORE_TORCH]:.3f}" if GALORE_TORCH in full else "-"
        vs_fused = f"{full[name] / full[TORCH_ADAMW_FUSED]:.3f}"
        rows.append([name, f"{full[name]:.3f}", f"{measured[name] / base_full:.3f}", vs_fused,
                     f"{opt[name] / base_opt:.2f}", f"{split['regular']['opt'] / base_opt:.2f}", refresh_extra,
                     vs_galore_torch, sum(syncs[name].values()), format_syncs(syncs[name])])
    step_table = markdown_table(
        ["optimizer", f"full step, amortized gap {args.gap} (x AdamW)", "same, each candidate's own fwd+bwd",
         "full step (x AdamW fused)", "optimizer step, amortized (x AdamW)", "optimizer step, no refresh (x AdamW)",
         "one refresh costs (x AdamW full step)", "full step vs galore-torch", "host syncs per step",
         "which"], rows)

    svd_time = refresh_times["svd"]
    refresh_rows = [[name, f"{svd_time / t:.2f}x", f"{t / svd_time:.3f}",
                     f"{refresh_state[name]:,}" if name in refresh_state else "(pickled object)"]
                    for name, t in refresh_times.items()]
    refresh_table = markdown_table(["projector", "speed-up vs exact SVD", "time (x exact SVD)",
                                    "state bytes (checkpoint)"], refresh_rows)

    def verdict(ok):
        return "met" if ok else "MISSED"

    targets = []
    if "galore" in full:
        ratio = full["galore"]
        targets.append(f"- `galore` full step amortized at gap {args.gap}: {ratio:.3f}x AdamW, "
                       f"{full['galore'] / full[TORCH_ADAMW_FUSED]:.3f}x AdamW fused (target <= 1.03 x AdamW: "
                       f"{verdict(ratio <= 1.03)}; with its own fwd+bwd median: {measured['galore'] / base_full:.3f}x)")
    if "galore" in full and "galore_8bit" in full:
        ratio = full["galore_8bit"] / full["galore"]
        targets.append(f"- `galore_8bit` full step: {ratio:.3f}x `galore` (target <= 1.10: {verdict(ratio <= 1.10)})")
        if BNB_ADAMW8BIT in full:
            ratio = full["galore_8bit"] / full[BNB_ADAMW8BIT]
            targets.append(f"- `galore_8bit` full step: {ratio:.3f}x bitsandbytes AdamW8bit (target <= 1.00: "
                           f"{verdict(ratio <= 1.0)})")
    if "galore" in full and GALORE_TORCH in full:
        vs = full["galore"] / full[GALORE_TORCH]
        targets.append(f"- `galore` vs galore-torch (full step, amortized): {vs:.3f}x (target <= 1.00: "
                       f"{verdict(vs <= 1.0)})")
    ours = {name: sum(syncs[name].values()) for name in args.modes}
    targets.append(f"- host syncs per regular step, hf_lowrank modes: {ours} (target 0: "
                   f"{verdict(not any(ours.values()))})")
    speedup = svd_time / refresh_times["subspace"]
    targets.append(f"- `subspace` (warm-started) refresh: {speedup:.2f}x faster than exact SVD "
                   f"(target >= 20: {verdict(speedup >= 20)})")
    for name in ("randomized", "dct"):
        speedup = svd_time / refresh_times[name]
        targets.append(f"- `{name}` refresh: {speedup:.2f}x faster than exact SVD "
                       f"(target >= 4: {verdict(speedup >= 4)})")

    markdown = "\n".join([
        f"# Step time (CPU, {args.threads} thread(s), interleaved)",
        "",
        f"Command: `{command_line(NAME, argv)}`",
        "",
        f"Tiny LLaMA: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads} heads, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; GaLore rank {args.rank} on "
        f"attention + MLP linears. {args.rounds} timed rounds after {args.warmup} warm-up rounds; each round steps "
        f"every optimizer once, round-robin. Projector refresh every {args.gap_run} steps while timing; figures at "
        f"gap {args.gap} are amortized from the medians of regular and refresh steps. All figures are ratios of "
        f"medians to torch.optim.AdamW measured side by side (AdamW full step here: {base_full * 1e3:.0f} ms, of "
        f"which the optimizer step {base_opt * 1e3:.0f} ms; informational only). Forward+backward is identical work "
        f"for every candidate, so the full-step column uses its median over all candidates; the next column uses "
        f"each candidate's own, which shows the noise left by other processes on the shared cores. Load average "
        f"(1 / 5 / 15 min) before timing: {format_load(load[0])}, after: {format_load(load[1])} (2 cores shared). "
        f"Host syncs: calls that read a tensor value into Python during one regular `step()` (torch's for-loop "
        f"AdamW reads its step counters, which stay on the CPU even for CUDA parameters, so they do not wait "
        f"for the device there; every other read would).",
        "",
        step_table,
        "",
        f"## One projector refresh: {args.refresh_shape[0]} x {args.refresh_shape[1]} fp32 gradient, "
        f"rank {args.refresh_rank}",
        "",
        f"Median of {args.refresh_repeats} interleaved repeats.",
        "",
        refresh_table,
        "",
        "## Targets",
        "",
        *targets,
    ])

    fig, axes = new_figure(2, width=6.5)
    names = list(summary)
    axes[0, 0].barh(names, [full[n] for n in names], color="tab:blue", label="full step")
    axes[0, 0].barh(names, [opt[n] / base_full for n in names], color="tab:orange", label="optimizer step")
    axes[0, 0].axvline(1.0, color="k", lw=0.8)
    axes[0, 0].set_xlabel(f"time per step, amortized at gap {args.gap} (x torch AdamW full step)")
    axes[0, 0].set_xlim(0, max(full.values()) * 1.4)  # room for the legend
    axes[0, 0].legend(loc="upper right")
    axes[0, 0].invert_yaxis()
    axes[0, 1].barh(list(refresh_times), [t / svd_time for t in refresh_times.values()], color="tab:green")
    axes[0, 1].set_xlabel("one refresh (x exact SVD)")
    axes[0, 1].set_title(f"{args.refresh_shape[0]}x{args.refresh_shape[1]}, rank {args.refresh_rank}")
    axes[0, 1].invert_yaxis()
    write_results(NAME, args.out_dir, markdown, fig)
    return {"full": full, "refresh": refresh_times, "syncs": syncs, "load": load}


if __name__ == "__main__":
    main()
