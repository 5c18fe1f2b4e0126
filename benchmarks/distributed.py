"""Distributed training on 2 gloo processes (1 thread each): what each rank holds, sends and spends.

    python benchmarks/distributed.py                 # launches `torchrun --nproc_per_node 2` itself

The default per-rank batch (1 x 64 tokens) is the regime these methods are for: weights, gradients and optimizer
state dominate memory, not activations (GaLore's 7B figure is for <= 500 tokens per GPU). With larger batches
the peak is set by activations during backward and layer-wise updates cannot lower it.

Arms (tiny LLaMA, fp32, per-rank batch x seq tokens): AdamW / GaLore / layer-wise GaLore under DDP and FSDP2
(``fully_shard`` per decoder layer and at the root), GaLore under DDP with every rank recomputing every refresh
(``distributed='off'``, the anchors' behaviour) for the refresh-time ratio, and transformers' built-in
``galore_adamw`` (galore-torch's GaLoreAdamW, as ``Trainer`` builds it) under DDP; its layer-wise variant is
refused by transformers under DDP, which the table records.

Per rank: optimizer-state bytes (local tensors), peak training memory (Linux peak RSS over steps 2..N, minus
the RSS before the model was built: parameters, DDP buckets, gradients, state, activations and transients as the
process really holds them, with glibc told to return freed buffers at once), bytes sent by
hf_lowrank's own collectives per step and per refresh (measured), the framework's gradient / parameter traffic
(DDP all-reduce, FSDP2 all-gather + reduce-scatter; computed from the parameter bytes), and refresh wall time.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402


NAME = "distributed"
ARMS = [
    ("DDP", "adamw", False), ("DDP", "galore", False), ("DDP", "galore", True), ("DDP", "galore:every-rank", False),
    ("DDP", "transformers galore_adamw", False), ("DDP", "transformers galore_adamw_layerwise", True),
    ("FSDP2", "adamw", False), ("FSDP2", "galore", False), ("FSDP2", "galore", True),
    ("FSDP2", "transformers galore_adamw", False),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--gap", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1, help="per-rank batch")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--name", default=NAME, help="results file name (<out-dir>/<name>.md / .png)")
    parser.add_argument("--out-dir", default=str(common.DEFAULT_OUT_DIR))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the torchrun worker's JSON output dir
    return parser.parse_args(argv)


# --- inside each torchrun worker -----------------------------------------------------------------------------
def galore_torch_state_bytes(optimizer) -> int:
    from hf_lowrank.optim.distributed import local

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            value = getattr(value, "ortho_matrix", value)  # galore-torch's projector object holds its basis
            if torch.is_tensor(value):
                value = local(value)  # a DTensor counts its local shard
                total += value.numel() * value.element_size()
    return total


def wrap(model, layout):
    """DDP, or FSDP2 with ``fully_shard`` on each decoder layer and at the root."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if layout == "DDP":
        return DistributedDataParallel(model)
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def build_arm(layout, mode, layerwise, args):
    from hf_lowrank import create_optimizer

    model = common.build_llama(args.hidden, args.intermediate, args.heads, args.layers, args.vocab, max_positions=args.seq)
    options = {"rank": args.rank, "update_proj_gap": args.gap, "lr": 1e-3, "target_modules": common.PAPER_TARGET_MODULES}
    wrapped = wrap(model, layout)
    if mode.startswith("transformers"):
        from transformers import Trainer, TrainingArguments

        training_args = TrainingArguments("/tmp/unused", optim=mode.split()[1], optim_target_modules=["attn", "mlp"],
                                          optim_args=f"rank={args.rank}, update_proj_gap={args.gap}", use_cpu=True,
                                          learning_rate=1e-3, report_to=[])
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
        params = kwargs.pop("params")
        return model, wrapped, cls(params, **kwargs), "galore-torch"
    name = mode.split(":")[0]
    if mode.endswith(":every-rank"):
        options["distributed"] = "off"
    if name == "adamw":
        options = {"lr": 1e-3}
    return model, wrapped, create_optimizer(wrapped, name, layerwise=layerwise, **options), "hf_lowrank"


def run_arm(layout, mode, layerwise, args, rank, world_size):
    from hf_lowrank import optimizer_state_bytes

    row = {"layout": layout, "mode": mode, "layerwise": layerwise}
    gc.collect()
    baseline = common.rss_kb()
    try:
        model, wrapped, optimizer, kind = build_arm(layout, mode, layerwise, args)
    except (NotImplementedError, ValueError) as err:
        row["refused"] = f"{type(err).__name__}: {err}"
        return row
    generator = torch.Generator().manual_seed(1 + rank)
    tokens = common.load_corpus("train")
    times = []
    for step in range(args.steps):
        ids = common.random_windows(tokens, args.batch, args.seq, generator) % args.vocab
        if step == 1:  # the first step allocates the optimizer state; measure the steady state after it
            common.reset_peak_rss()
        started = time.perf_counter()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        try:
            optimizer.step()
        except Exception as err:  # an anchor that cannot step this layout: recorded, not hidden
            row["refused"] = f"fails at step(): {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            return row
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    row["peak_bytes"] = (common.rss_kb("VmHWM") - baseline) * 1024
    inner = getattr(optimizer, "optimizer", optimizer)
    if kind == "galore-torch":
        row["state_bytes"] = galore_torch_state_bytes(optimizer)
    else:
        row["state_bytes"] = optimizer_state_bytes(inner)  # hf_lowrank keeps local shards in optimizer.state
        refreshes = len(range(0, args.steps, args.gap))
        row["refreshes"] = refreshes
        row["refresh_seconds"] = inner.comm.refresh_seconds / refreshes if "galore" in mode else 0.0
        row["own_refresh_bytes"] = inner.comm.refresh_bytes / refreshes if "galore" in mode else 0
        row["own_step_bytes"] = inner.comm.step_bytes / args.steps
    if layerwise:
        optimizer.remove_hooks()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a DTensor counts globally
    # Ring all-reduce sends 2 (W-1)/W of the buffer per rank; FSDP2 all-gathers the parameters in forward and
    # again in backward (reshard_after_forward) and reduce-scatters the gradients: 3 (W-1)/W per rank.
    share = (world_size - 1) / world_size
    row["framework_step_bytes"] = (2 if layout == "DDP" else 3) * share * param_bytes
    row["step_seconds"] = sorted(times[1:])[len(times[1:]) // 2]
    return row


def refresh_times(args, repeats=7):
    """Per-rank wall time of one refresh of every projected matrix, owner + broadcast vs every rank recomputing
    everything, measured interleaved on the same DDP model and gradient (update_proj_gap=1, lr=0)."""
    from hf_lowrank import create_optimizer

    model = common.build_llama(args.hidden, args.intermediate, args.heads, args.layers, args.vocab, max_positions=args.seq)
    ddp = wrap(model, "DDP")
    ids = common.random_windows(common.load_corpus("train"), args.batch, args.seq, torch.Generator().manual_seed(0))
    ddp(input_ids=ids % args.vocab, labels=ids % args.vocab).loss.backward()
    options = {"rank": args.rank, "update_proj_gap": 1, "lr": 0.0, "target_modules": common.PAPER_TARGET_MODULES}
    optimizers = {policy: create_optimizer(ddp, "galore", distributed=policy, **options) for policy in ("auto", "off")}
    times = {policy: [] for policy in optimizers}
    for _ in range(repeats):
        for policy, optimizer in optimizers.items():
            torch.distributed.barrier()  # start together: a rank's lead in the previous call is not waiting time
            before = optimizer.comm.refresh_seconds
            optimizer.step()
            times[policy].append(optimizer.comm.refresh_seconds - before)
    return {policy: sorted(values[1:])[len(values[1:]) // 2] for policy, values in times.items()}


def worker(args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == 2, f"this benchmark needs 2 processes, got {world_size}"
    rows = []
    # warm-up, not reported: one-time allocations (thread pools, gloo buffers, Trainer's accelerate state)
    run_arm("DDP", "adamw", False, args, rank, world_size)
    run_arm("DDP", "transformers galore_adamw", False, args, rank, world_size)
    for layout, mode, layerwise in ARMS:
        dist.barrier()
        rows.append(run_arm(layout, mode, layerwise, args, rank, world_size))
    dist.barrier()
    rows.append({"layout": "refresh", "mode": "interleaved", "layerwise": False, **refresh_times(args)})
    if rank == 0:  # the single-process GaLore state, sized without allocating (meta tensors)
        from hf_lowrank import create_optimizer, optimizer_state_bytes

        model = common.build_llama(args.hidden, args.intermediate, args.heads, args.layers, args.vocab, device="meta")
        single = create_optimizer(model, "galore", rank=args.rank, target_modules=common.PAPER_TARGET_MODULES,
                                  distributed="off")
        single.init_state()
        rows.append({"layout": "1 process", "mode": "galore", "layerwise": False,
                     "state_bytes": optimizer_state_bytes(single)})
    Path(args.worker).mkdir(parents=True, exist_ok=True)
    (Path(args.worker) / f"rank{rank}.json").write_text(json.dumps(rows, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# --- the launcher: runs the workers, renders the table and the plot ------------------------------------------
def launch(args, argv, scratch: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.REPO_ROOT), **common.RSS_TRACKING_ENV}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               *argv, "--worker", str(scratch)]
    subprocess.run(command, env=env, check=True)
    return [json.loads((scratch / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def label(row):
    return f"{row['layout']} {row['mode']}{' layer-wise' if row['layerwise'] and 'layerwise' not in row['mode'] else ''}"


def render(ranks, args, argv):
    rank0, rank1 = ranks
    single = next(r for r in rank0 if r["layout"] == "1 process")
    refresh = [next(r for r in rows if r["layout"] == "refresh") for rows in ranks]
    rows0 = [r for r in rank0 if r["layout"] not in ("1 process", "refresh")]
    by_label = {label(r): (r, o) for r, o in zip(rows0, rank1)}
    fmt = common.format_bytes
    table = []
    for name, (r0, r1) in by_label.items():
        if "refused" in r0:
            table.append([name, "refused: " + r0["refused"].split(". ")[0].replace("|", "/"), "", "", "", "", ""])
            continue
        table.append([
            name, f"{fmt(r0['state_bytes'])} / {fmt(r1['state_bytes'])}",
            f"{fmt(r0['peak_bytes'])} / {fmt(r1['peak_bytes'])}",
            fmt(r0.get("own_step_bytes", 0)) if "own_step_bytes" in r0 else "n/a",
            fmt(r0.get("own_refresh_bytes", 0)) if "own_refresh_bytes" in r0 else "n/a",
            fmt(r0["framework_step_bytes"]),
            f"{r0['refresh_seconds'] * 1e3:.0f} / {r1['refresh_seconds'] * 1e3:.0f} ms" if r0.get("refresh_seconds")
            else "-",
        ])
    fsdp = by_label["FSDP2 galore"]
    ddp_plain, ddp_layerwise = by_label["DDP galore"], by_label["DDP galore layer-wise"]
    state_ratio = max(fsdp[0]["state_bytes"], fsdp[1]["state_bytes"]) / single["state_bytes"]
    peak_layerwise = max(r["peak_bytes"] for r in ddp_layerwise)
    peak_plain = max(r["peak_bytes"] for r in ddp_plain)
    refresh_ratio = max(r["auto"] for r in refresh) / max(r["off"] for r in refresh)
    targets = [
        ["FSDP2 per-rank GaLore state / 1-process GaLore state", "<= 0.55", f"{state_ratio:.3f}",
         "met" if state_ratio <= 0.55 else "missed"],
        ["DDP layer-wise peak memory / DDP peak memory", "< 1", f"{peak_layerwise / peak_plain:.3f}",
         "met" if peak_layerwise < peak_plain else "missed"],
        ["per-rank refresh time, owner + broadcast / every rank recomputes (interleaved, median of 6; "
         f"{max(r['auto'] for r in refresh) * 1e3:.0f} vs {max(r['off'] for r in refresh) * 1e3:.0f} ms)",
         "<= 0.6", f"{refresh_ratio:.3f}",
         "met" if refresh_ratio <= 0.6 else "missed"],
    ]
    markdown = "\n\n".join([
        f"# Distributed: 2 gloo processes, tiny LLaMA (hidden {args.hidden}, {args.layers} layers, intermediate "
        f"{args.intermediate}, vocab {args.vocab}), rank {args.rank}, gap {args.gap}, per-rank batch "
        f"{args.batch} x {args.seq}, {args.steps} steps",
        f"Command: `{common.command_line(NAME, argv)}`. Single-process GaLore state: {fmt(single['state_bytes'])}. "
        "Values are rank 0 / rank 1. Peak memory: peak RSS over steps 2..N minus the RSS before the model was "
        "built (parameters, buckets, gradients, state, activations, transients). Own bytes: hf_lowrank's collectives, measured (refresh: per refresh). Framework bytes: "
        "DDP's gradient all-reduce / FSDP2's all-gathers and reduce-scatter per step and rank, from the parameter "
        "bytes. Refresh time: wall time per refresh on each rank within that arm's run (arms run one after "
        "another; the target below uses the interleaved measurement).",
        common.markdown_table(["arm", "optimizer state", "peak memory", "own bytes / step",
                               "own bytes / refresh", "framework bytes / step", "refresh time"], table),
        "## Targets",
        common.markdown_table(["target", "bound", "measured", ""], targets),
    ])
    figure, axes = common.new_figure(ncols=2, width=6.5)
    measured = [(n, r) for n, r in by_label.items() if "refused" not in r[0]]
    names = [n for n, _ in measured]
    axes[0][0].barh(names, [max(r[0]["state_bytes"], r[1]["state_bytes"]) / 1e6 for _, r in measured])
    axes[0][0].axvline(single["state_bytes"] / 1e6, color="k", ls="--", label="1-process GaLore")
    axes[0][0].set_xlabel("optimizer state per rank (MB)")
    axes[0][0].legend(loc="lower right")
    axes[0][1].barh(names, [max(r[0]["peak_bytes"], r[1]["peak_bytes"]) / 1e6 for _, r in measured])
    axes[0][1].set_xlabel("peak training memory per rank (MB, RSS)")
    axes[0][1].set_yticklabels([])
    common.write_results(args.name, args.out_dir, markdown, figure)
    return {"rows": by_label, "single_state_bytes": single["state_bytes"], "targets": targets}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    common.setup_environment(1)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        ranks = launch(args, argv, Path(scratch))
    return render(ranks, args, argv)


if __name__ == "__main__":
    main()
