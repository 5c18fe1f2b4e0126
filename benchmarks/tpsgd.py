"""tpSGD vs backprop vs DRTP on sklearn's digits (1797 real 8x8 images) and MNIST: MLP, CNN, RNNs reading rows.

For every architecture and method the learning rate is picked from the same grid (`--lrs`) on a validation
split carved from the training set (seed 0), then each method is trained with 5 seeds (model init, P, data order)
and scored on the held-out test set. All runs go through `TpSGDTrainer` with the same TrainingArguments
(Adam, batch 32, constant lr, no clipping), only `TpSGDConfig.mode` differs. Also reported: peak saved-activation
bytes (saved_tensors_hooks) and the step-time ratio to BP, timed interleaved on the same batches.

    python benchmarks/tpsgd.py                     # digits, MLP/CNN/GRU, 10 epochs, 5 seeds, lr 3e-3
    python benchmarks/tpsgd.py --epochs 30 --lrs 1e-3 3e-3 1e-2 --archs mlp cnn rnn gru lstm gru2
    python benchmarks/tpsgd.py --dataset mnist --archs mlp --epochs 5   # MNIST test set split 8k/2k
    python benchmarks/tpsgd.py --depth-sweep      # saved-activation bytes of equal-width MLPs, L = 2..8

`--dataset mnist` reads the 10k MNIST test images in data/mnist (the only MNIST part available offline) and
splits them 8000 train / 2000 test, stratified with seed 0. `gru2` is a 2-layer GRU (each layer trained on
its own targets). `--partial` runs add their rows to the merged table, `--merge-only` rebuilds it.

For recurrent archs tpSGD also picks its target options on the same validation split: `recurrent_projection`
(one P per layer or one per time step), `recurrent_step_weights` (uniform or growing with t) and
`projection_scale`; DRTP keeps its definition (one kaiming-uniform B per layer) and BP has no targets.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import load_mnist_test_set  # noqa: E402
from hf_lowrank.tpsgd import (  # noqa: E402  (before transformers: keeps bitsandbytes' import-time warnings quiet)
    InputsLabelsDataset, LastTimeStep, TpSGDConfig, TpSGDModel, TpSGDTrainer,
)
from transformers import PrinterCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
METHODS = ("bp", "tpsgd", "drtp")
RECURRENT = ("rnn", "gru", "lstm", "gru2")
ARCHS = ("mlp", "cnn") + RECURRENT


def build(arch: str, side: int) -> nn.Sequential:
    """The network for `side` x `side` images (8 for digits, 28 for MNIST)."""
    if arch == "mlp":
        return nn.Sequential(
            nn.Linear(side * side, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        )
    if arch == "cnn":  # DRTP's reference topology CONV_32_5_1_2_FC_1000_FC_10, scaled down
        return nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (side // 2) ** 2, 256), nn.Tanh(), nn.Linear(256, 10),
        )
    cell = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM, "gru2": nn.GRU}[arch]  # reads the image row by row
    layers = 2 if arch == "gru2" else 1
    return nn.Sequential(
        nn.Unflatten(1, (side, side)), cell(side, 128, num_layers=layers, batch_first=True), LastTimeStep(),
        nn.Linear(128, 10),
    )


def image_side(X: torch.Tensor) -> int:
    return int(round(X.shape[1] ** 0.5))


def arch_input(arch: str, X: torch.Tensor) -> torch.Tensor:
    side = image_side(X)
    return X.view(-1, 1, side, side) if arch == "cnn" else X


def data(dataset="digits", seed=0):
    if dataset == "mnist":
        X, y = load_mnist_test_set()
        X = (X / 255.0).astype(np.float32)
        test_size = 2000
    else:
        X, y = load_digits(return_X_y=True)
        X, test_size = (X / 16.0).astype(np.float32), 0.25
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)
    X_fit, X_val, y_fit, y_val = train_test_split(
        X_train, y_train, test_size=0.25, stratify=y_train, random_state=seed
    )
    t = lambda a: torch.tensor(a)  # noqa: E731
    return {"train": (t(X_train), t(y_train)), "test": (t(X_test), t(y_test)),
            "fit": (t(X_fit), t(y_fit)), "val": (t(X_val), t(y_val))}


def trainer_for(arch, method, lr, seed, train, epochs, out, options=None):
    torch.manual_seed(seed)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=32, num_train_epochs=epochs, learning_rate=lr, seed=seed,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="no", logging_strategy="no",
    )
    cfg = TpSGDConfig(mode=method, seed=seed, projection="kaiming_uniform" if method == "drtp" else "gaussian",
                      **(options or {}))
    X, y = train
    trainer = TpSGDTrainer(model=build(arch, image_side(X)), args=args, tpsgd_config=cfg,
                           train_dataset=InputsLabelsDataset(arch_input(arch, X), y))
    trainer.remove_callback(PrinterCallback)
    return trainer


def accuracy(trainer, arch, split):
    X, y = split
    logits = trainer.predict(InputsLabelsDataset(arch_input(arch, X), y)).predictions
    return 100.0 * float((logits.argmax(-1) == y.numpy()).mean())


def step_time_ratios(arch, splits, reps, out, options):
    """Median time of one optimizer step per method / BP's, timed round-robin on the same batches."""
    X, y = splits["train"]
    trainers = {m: trainer_for(arch, m, 1e-3, 0, splits["train"], 1, out, options[m]) for m in METHODS}
    for t in trainers.values():
        t.create_optimizer()
        t.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call training_step directly
    batches = [{"inputs": arch_input(arch, X[i:i + 32]), "labels": y[i:i + 32]} for i in range(0, 320, 32)]
    times = {m: [] for m in METHODS}
    for rep in range(reps):
        for m in METHODS:
            t = trainers[m]
            batch = batches[rep % len(batches)]
            start = time.perf_counter()
            t.training_step(t.model, batch)
            t.optimizer.step()
            t.optimizer.zero_grad()
            times[m].append(time.perf_counter() - start)
    base = statistics.median(times["bp"])
    return {m: statistics.median(v) / base for m, v in times.items()}


def depth_sweep(depths, width, batch=32):
    """Peak saved-activation bytes of one training step of equal-width MLPs (width-wide input, L - 1 tanh
    layers of `width`, 10 classes) for every method, on one random batch (memory does not depend on the data)."""
    rows = []
    x, labels = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    for depth in depths:
        peaks = {}
        for method in METHODS:
            torch.manual_seed(0)
            layers = []
            for _ in range(depth - 1):
                layers += [nn.Linear(width, width), nn.Tanh()]
            model = TpSGDModel(nn.Sequential(*layers, nn.Linear(width, 10)), TpSGDConfig(mode=method))
            with model.memory.track("bp"):  # the tpSGD step labels its layers itself; "bp" is used only by BP
                if method == "bp":
                    model(x, labels).loss.backward()
                else:
                    model.local_step(x, labels)
            peaks[method] = model.memory.peak_bytes
        rows.append({"L": depth, "width": width, **peaks,
                     "input_output_bound": 2 * width * batch * 4})  # a layer-local step that saves its output too
    return rows


def run_archs(args):
    """Train every (arch, method) of `args.archs` on `args.dataset` and return the table rows."""
    splits = data(args.dataset)
    out = tempfile.mkdtemp(prefix="tpsgd_bench_")
    rows, chosen = [], {}
    for arch in args.archs:
        layers = None
        results = {}
        for method in METHODS:
            option_grid = [()]
            if method == "tpsgd" and arch in RECURRENT:
                option_grid = [
                    (("recurrent_projection", a), ("recurrent_step_weights", b), ("projection_scale", c))
                    for a, b, c in itertools.product(args.recurrent_projections, args.step_weights,
                                                     args.projection_scales)
                ]
            elif method == "tpsgd" and len(args.projection_scales) > 1:
                option_grid = [(("projection_scale", c),) for c in args.projection_scales]
            grid = [(lr, options) for lr in args.lrs for options in option_grid]
            val = {grid[0]: float("nan")}
            for lr, options in grid if len(grid) > 1 else []:
                scores = []
                for seed in range(args.val_seeds):
                    trainer = trainer_for(arch, method, lr, seed, splits["fit"], args.epochs, out, dict(options))
                    trainer.train()
                    scores.append(accuracy(trainer, arch, splits["val"]))
                val[(lr, options)] = statistics.mean(scores)
            lr, options = max(val, key=val.get)
            chosen[(arch, method)] = (lr, dict(options))
            accs, peak = [], 0
            for seed in range(args.seeds):
                trainer = trainer_for(arch, method, lr, seed, splits["train"], args.epochs, out, dict(options))
                trainer.train()
                accs.append(accuracy(trainer, arch, splits["test"]))
                peak = max(peak, trainer.memory_report["peak_saved_bytes"])
                layers = trainer.tpsgd_model.num_layers
            val_text = {f"lr {a:g} {describe(b)}": round(v, 2) for (a, b), v in val.items() if v == v}
            results[method] = (accs, peak, lr, describe(options), val_text)
            print(f"{args.dataset} {arch} {method}: lr {lr:g} {describe(options)} (val {val_text}) test "
                  f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs) if len(accs) > 1 else 0:.2f} peak {peak}",
                  flush=True)
        ratios = step_time_ratios(arch, splits, args.timing_reps, out, {m: chosen[(arch, m)][1] for m in METHODS})
        bp_acc, bp_peak = statistics.mean(results["bp"][0]), results["bp"][1]
        for method in METHODS:
            accs, peak, lr, target, val_text = results[method]
            rows.append({
                "data": args.dataset, "arch": arch, "L": layers, "method": method, "lr": lr, "targets": target,
                "acc": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "seeds": len(accs), "epochs": args.epochs, "gap": statistics.mean(accs) - bp_acc, "peak": peak,
                "mem_ratio": peak / bp_peak, "time_ratio": ratios[method], "val": val_text,
            })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3],
                        help="learning-rate grid, searched per (arch, method) on the validation split; with one "
                        "value there is no search (3e-3 won for all three methods on the MLP's validation split)")
    parser.add_argument("--archs", nargs="+", default=["mlp", "cnn", "gru"], choices=ARCHS)
    parser.add_argument("--recurrent-projections", nargs="+", default=["shared", "per_step"],
                        choices=["shared", "per_step"],
                        help="TpSGDConfig.recurrent_projection grid for tpSGD on recurrent archs (validation split)")
    parser.add_argument("--step-weights", nargs="+", default=["uniform", "linear"], choices=["uniform", "linear"],
                        help="TpSGDConfig.recurrent_step_weights grid for tpSGD on recurrent archs")
    parser.add_argument("--projection-scales", nargs="+", type=float, default=[1.0],
                        help="TpSGDConfig.projection_scale grid for tpSGD (validation split)")
    parser.add_argument("--val-seeds", type=int, default=3,
                        help="seeds averaged per grid point on the validation split (seed noise is 1-3 pt)")
    parser.add_argument("--partial", action="store_true",
                        help="save only this run's rows (results/tpsgd_<dataset>_<archs>.json); the table merges "
                        "all partials")
    parser.add_argument("--timing-reps", type=int, default=30)
    parser.add_argument("--depth-sweep", action="store_true",
                        help="only measure equal-width MLPs for L in --depths (results/tpsgd_depth.json)")
    parser.add_argument("--depths", type=int, nargs="+", default=list(range(2, 9)))
    parser.add_argument("--width", type=int, default=256, help="width of the depth sweep's MLPs")
    parser.add_argument("--merge-only", action="store_true", help="only rebuild the table/plot from the partials")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    os.makedirs(RESULTS, exist_ok=True)
    depth_path = os.path.join(RESULTS, "tpsgd_depth.json")
    if args.depth_sweep:
        with open(depth_path, "w") as f:
            json.dump(depth_sweep(args.depths, args.width), f)
    rows = [] if args.merge_only or args.depth_sweep else run_archs(args)
    if rows and not args.partial:
        depth = depth_sweep(args.depths, args.width)
    else:  # merge every partial run and the last depth sweep
        if rows:
            with open(os.path.join(RESULTS, f"tpsgd_{args.dataset}_{'_'.join(args.archs)}.json"), "w") as f:
                json.dump(rows, f)
        rows = []
        for name in sorted(os.listdir(RESULTS)):
            if name.startswith("tpsgd_") and name.endswith(".json") and name != "tpsgd_depth.json":
                with open(os.path.join(RESULTS, name)) as f:
                    rows.extend(json.load(f))
        rows.sort(key=lambda r: (r["data"] != "digits", ARCHS.index(r["arch"]), METHODS.index(r["method"])))
        depth = []
        if os.path.exists(depth_path):
            with open(depth_path) as f:
                depth = json.load(f)
    write(rows, depth)


def describe(options) -> str:
    """Short text of a tpSGD option tuple for the table ('-' for the defaults)."""
    return ", ".join(f"{value}" if key != "projection_scale" else f"P scale {value:g}" for key, value in options) or "-"


def write(rows, depth):
    header = ("| data | arch | L | method | lr | tpSGD target options | epochs | test acc % (mean ± std, seeds) | "
              "gap to BP (pt) | peak saved act. bytes | vs BP | 1/L | <= 1/L | step time vs BP |")
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['arch']} | {r['L']} | {r['method']} | {r['lr']:g} | {r['targets']} | {r['epochs']} | "
            f"{r['acc']:.2f} ± {r['std']:.2f} ({r['seeds']}) | {r['gap']:+.2f} | {r['peak']:,} | "
            f"{r['mem_ratio']:.2f} | {1 / r['L']:.2f} | {'-' if r['method'] == 'bp' else yes(r['mem_ratio'], r['L'])} "
            f"| {r['time_ratio']:.2f} |"
        )
    table = "\n".join(lines)
    sweep = ["| L | BP bytes | tpSGD bytes | tpSGD / BP | DRTP / BP | 1/L | <= 1/L | input + output / BP |",
             "|" + "---|" * 8]
    for d in depth:
        sweep.append(
            f"| {d['L']} | {d['bp']:,} | {d['tpsgd']:,} | {d['tpsgd'] / d['bp']:.3f} | {d['drtp'] / d['bp']:.3f} | "
            f"{1 / d['L']:.3f} | {yes(d['tpsgd'] / d['bp'], d['L'])} | {d['input_output_bound'] / d['bp']:.3f} |"
        )
    validation = [f"- {r['data']} {r['arch']} {r['method']}: {r['val']}" for r in rows if r.get("val")]
    targets = []
    for data_name, arch in dict.fromkeys((r["data"], r["arch"]) for r in rows):
        by = {r["method"]: r for r in rows if (r["data"], r["arch"]) == (data_name, arch)}
        tp, drtp = by["tpsgd"], by["drtp"]
        targets.append(
            f"| {data_name} | {arch} | {tp['gap']:+.2f} | {'yes' if tp['gap'] >= -5 else 'no'} | "
            f"{tp['acc'] - drtp['acc']:+.2f} | {'yes' if tp['acc'] > drtp['acc'] else 'no'} | "
            f"{tp['mem_ratio']:.2f} vs {1 / tp['L']:.2f} | {yes(tp['mem_ratio'], tp['L'])} |"
        )
    targets = ["| data | arch | tpSGD - BP (pt) | within 5 pt | tpSGD - DRTP (pt) | above DRTP | "
               "saved act. / BP vs 1/L | <= 1/L |", "|" + "---|" * 8] + targets
    print(table)
    print("\n".join(sweep))
    text = TEMPLATE.format(table=table, targets="\n".join(targets), sweep="\n".join(sweep),
                           validation="\n".join(validation) or "-")
    with open(os.path.join(RESULTS, "tpsgd.md"), "w") as f:
        f.write(text)
    plot(rows, depth)


def yes(ratio, layers) -> str:
    return "yes" if ratio <= 1 / layers else "no"


TEMPLATE = """# tpSGD vs BP vs DRTP (benchmarks/tpsgd.py)

Made with exactly these commands (1 thread, `nice -n 5`, on the shared 2-core CPU):

```
python benchmarks/tpsgd.py --depth-sweep
python benchmarks/tpsgd.py --partial --archs mlp cnn
python benchmarks/tpsgd.py --partial --archs rnn gru lstm gru2 --recurrent-projections per_step --projection-scales 1 0.5
python benchmarks/tpsgd.py --partial --dataset mnist --archs mlp --epochs 5 --lrs 1e-3 3e-3 --projection-scales 1 4 --val-seeds 2
python benchmarks/tpsgd.py --merge-only
```

**Data.** digits: sklearn's `load_digits` (1797 real 8x8 images), stratified 75/25 train/test split (1347/450).
mnist: the 10k MNIST test images in `data/mnist` (the training images are not available offline), stratified
8000 train / 2000 test split with seed 0. Pixels scaled to [0, 1].

**Models.** mlp: in-256-256-10 (tanh); cnn: conv 32x5x5 (pad 2) + tanh + maxpool 2 + flatten + FC 256 (tanh) + FC
10; rnn/gru/lstm: one recurrent layer of 128 reading the image row by row (8 steps of 8 pixels on digits), last
state to FC 10; gru2: two stacked GRU layers of 128 (each trained on its own targets, no BPTT). L counts the
trained layers.

**Training.** Every run goes through `TpSGDTrainer` with the same `TrainingArguments` (Adam, batch 32, constant lr,
no clipping), only `TpSGDConfig.mode` differs; cross-entropy output loss. tpSGD: MSE local loss, tanh targets,
gaussian P (scale 1 unless chosen otherwise). DRTP: kaiming-uniform B, gradient labels @ B summed over the batch,
as its reference code. Test accuracy is the mean ± std over seeds 0..4 (model init, P, data order). digits: lr
3e-3 for every method (it won for all three on the MLP's validation split). Options are picked on a 25%
validation split of train (mean over `--val-seeds` seeds, listed under Validation): on the recurrent nets
tpSGD's recurrent_step_weights (uniform/linear) x projection_scale (1/0.5), with one P per time step; on MNIST
the lr (1e-3/3e-3) of every method and tpSGD's projection_scale (1/4). Step time: median of 30 optimizer steps
per method, timed round-robin on the same batches, over BP's; at batch 32 these small nets are dominated by
per-op overhead, and the shared CPU makes the ratios noisy (about ±0.2).

{table}

## Targets (issue 4: within 5 pt of BP, above DRTP, saved activations <= 1/L of BP)

{targets}

Step time: the recurrent tpSGD/DRTP rows are 1.4-2x slower per step than BP here, since each time step runs its
own small backward from Python, while BP's BPTT runs one backward over the whole unrolled graph; the
feed-forward rows are about BP's cost (digits) up to 1.6x (MNIST, noisy; 1.2x in a quiet in-process check).

## Saved-activation memory

The tracker (`SavedTensorTracker`, `torch.autograd.graph.saved_tensors_hooks`) counts every storage autograd
saves for a backward pass, parameters excluded, per storage (a saved view counts its whole storage, since it
keeps it alive); BP is measured the same way on the same step. tpSGD and DRTP use a fused layer-local step:
the Linear/Conv op runs with autograd (it saves its input x for the weight gradient), the element-wise activation
runs outside autograd with its derivative f'(z) from forward-mode AD, the local (or task) loss gradient is in
closed form, and delta = dl/dh * f'(z) goes straight into the Linear/Conv backward. So a layer keeps only its
input while its update is formed; its output is not saved, it is handed to the next layer (as BP's transient
gradients, it is not in either figure). The peak is therefore the widest layer input, max_i n_(i-1), against
BP's sum_i n_(i-1) plus its logits. An earlier version saved each layer's input and output (2/(L+1) of BP for
equal widths: MLP 0.86, CNN 0.54 of BP); the last column of the depth sweep shows that figure.

Depth sweep (`--depth-sweep`): equal-width MLPs, width 256 input and hidden layers, L - 1 tanh layers + FC 10,
batch 32, one step. tpSGD is at or below 1/L for every L (BP also saves its logits).

{sweep}

Which rows meet <= 1/L and why the others cannot:
- cnn, rnn, gru, lstm, gru2 and every depth-sweep row meet it. A recurrent layer frees its cell graph after
  each time step, so it holds one step's gates plus its input sequence, not the unrolled sequence BPTT keeps.
- mlp (digits 64-256-256-10 and MNIST 784-256-256-10) cannot with any layer-local rule that forms an exact
  weight gradient on the whole batch: layer i's gradient delta_i^T x_(i-1) needs its full input x_(i-1), and here
  one input is a large share of all activations BP keeps (digits: 256 of 64+256+256 units plus logits, 0.43;
  MNIST: the 784-pixel input of 784+256+256, 0.60). Only splitting the batch would go lower, and that would cut
  BP's figure the same way. With equal widths (depth sweep) the same rule gives <= 1/L.

## Recurrent targets

With one P for all time steps (recurrent_projection='shared') the row-by-row GRU reached 80.6 ± 2.8% (gap -16
pt, earlier run of this script with the full grid). Its state settles on the label code after a few rows and
later rows barely move it (on validation, |h_8 - h_7| / |h_8| was 0.21 with a shared P against 1.3 per step),
so the rows read last hardly count. One P per time step forces every step to re-encode the state with its new
row. In that full-grid validation (3 seeds, GRU) a shared P scored 73.6-78.6% for every weighting and scale and
per-step P 91.0-92.9%, so the rows here search only per-step P. DRTP keeps its definition (one B per layer,
shared over time) and fails on the recurrent nets.

## MNIST targets

A first MNIST run with the digits settings (lr 3e-3, P scale 1, no search) gave BP 93.78 ± 0.66, tpSGD 89.43 ±
1.13 (-4.35 pt) and DRTP 92.06 ± 0.37: with 784 inputs, scale-1 targets tanh(y P) are soft and tpSGD fell below
DRTP. One-seed probes on the validation split (tpSGD, 5 epochs): P scale 0.25 / 0.5 / 1 / 2 / 4 gave 84.4 / 85.1
/ 88.5 / 90.1 / 90.6%, lr 1e-3 89.6%, lr 1e-2 81.8%, BCE local loss 89.9%, DRTP 91.3%. The row above searches
lr and P scale for all methods on validation, as listed below.

## Validation (mean accuracy % on the validation split)

{validation}
"""


def plot(rows, depth):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["data"], r["arch"]) for r in rows))
    labels = [f"{a}\n{d}" for d, a in cases]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [2, 2, 1.2]})
    width = 0.27
    for k, method in enumerate(METHODS):
        sel = [next(r for r in rows if (r["data"], r["arch"]) == c and r["method"] == method) for c in cases]
        xs = np.arange(len(cases)) + (k - 1) * width
        axes[0].bar(xs, [r["acc"] for r in sel], width, yerr=[r["std"] for r in sel], label=method)
        axes[1].bar(xs, [r["mem_ratio"] for r in sel], width, label=method)
    axes[1].scatter(range(len(cases)), [1 / next(r["L"] for r in rows if (r["data"], r["arch"]) == c) for c in cases],
                    marker="_", s=600, color="k", label="1/L target", zorder=3)
    for ax, title in ((axes[0], "test accuracy (%)"), (axes[1], "peak saved activations / BP")):
        ax.set_xticks(range(len(cases)), labels, fontsize=8)
        ax.set_title(title)
        ax.legend(loc="upper center", ncol=4, fontsize=8)
    axes[0].set_ylim(0, 115)
    axes[1].set_ylim(0, 1.2)
    if depth:
        Ls = [d["L"] for d in depth]
        axes[2].plot(Ls, [d["tpsgd"] / d["bp"] for d in depth], "o-", label="tpSGD (fused step)")
        axes[2].plot(Ls, [d["input_output_bound"] / d["bp"] for d in depth], "s--", label="input + output saved")
        axes[2].plot(Ls, [1 / L for L in Ls], "k:", label="1/L")
        axes[2].set_xlabel("layers L (equal width)")
        axes[2].set_title("saved activations / BP, depth sweep")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "tpsgd.png"), dpi=120)


if __name__ == "__main__":
    main()
