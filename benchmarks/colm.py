"""CoLM b-of-2b vs random batches b and 2b: a tiny LLaMA on a skewed mixture of four real text sources, offline.

    python benchmarks/colm.py                 # lr choice on validation (seed 0), then seeds 0, 1, 2; ~15 min, 1 core
    python benchmarks/colm.py --steps 20 --seeds 0 --lr 1e-3 --time-rounds 2 --out-dir /tmp/colm   # smoke

Protocol (fixed before the first run; every number comes from this script):
- data (shipped in ``data/``, byte-level, vocab 256, sequences cut at ``--seq`` = 64 bytes; the loss is on every
  byte): SST-2 sentences (``glue/sst2``), commonsense questions (``commonsense/train_mix.json``, the question text
  after the LLM-Adapters instruction prefix), Shakespeare lines (``text/tinyshakespeare``, lines of >= 20 bytes) and
  MMLU questions (``mmlu``). Training mixture: 6,000 examples drawn once (seed 1234) in skewed proportions
  SST-2 60%, commonsense 25%, Shakespeare 10%, MMLU 5%. Held-out, per source, disjoint from training: a
  validation set and a test set of ``--heldout`` = 96 examples each (SST-2: the two halves of ``validation.jsonl``;
  commonsense: the last records of ``train_mix.json``, not trained on; Shakespeare: lines of ``val.txt``; MMLU:
  ``val.csv``, training from ``test.csv``).
- model: ``LlamaForCausalLM`` from a config (hidden 64, 4 layers, 4 heads, intermediate 128, untied), random
  init from the seed; AdamW (torch), linear decay with 5% warmup, weight decay 0, no clipping changes (Trainer's
  max_grad_norm 1.0); ``--steps`` = 200 optimizer steps for every arm; b = ``--batch`` = 16.
- arms: ``random-b`` (Trainer, batch b), ``random-2b`` (Trainer, batch 2b), ``colm`` (CoLMTrainer, large batch 2b,
  coreset_ratio 0.5, small_source_fraction 0.15 -> Shakespeare and MMLU are kept whole; default features:
  last block's v_proj, zeroth-order eps 1e-3, Adam normalisation, sparse_dim 2560, l1 facility location;
  gradient-matching cosine logged every 50 steps). Same data order per seed for every arm (Trainer's sampler).
- lr: the grid {1e-3, 3e-3} for each arm on seed 0, chosen by the validation loss (mixture-weighted, below);
  then seeds 0, 1, 2 at the chosen lr. Test sets are used for nothing but the final report.
- metric: final test loss per source (mean byte-level cross-entropy over that source's test set) and overall (the
  mixture-weighted mean of the four, weights 0.60/0.25/0.10/0.05); mean and std over the 3 seeds.
- memory: peak bytes of live tensors (parameters, gradients, optimizer state, activations, selection
  temporaries) over 3 training steps of each arm, tracked by torch's ``MemTracker`` (a dispatch mode that sees
  every tensor; exact, unlike the process RSS, which the ~400 MB of the Python + torch runtime dwarfs here).
- step time: one full training step (selection included for colm) of each arm, interleaved round-robin in one
  process (``--time-rounds`` = 15 after a warm-up); ratios of medians to random-b.
- targets (issue 19): colm test loss <= random-b on every source and overall <= 1.02 x random-2b (means over
  seeds); colm peak memory at the b level (<= 1.10 x random-b's, against 2b's ~2x).

Fine-tuning protocol (``--warm-start-steps N``, added 2026-12-04 before its first run; the from-scratch protocol
above is unchanged and stays the default): CoLM is a fine-tuning method, so every arm of a seed starts from the same
model pre-trained on text none of the four sources contains, WikiText-2 (``main_job/wikitext2_train.txt``, random
64-byte windows, batch b, torch AdamW lr 3e-3, 5% warm-up then linear decay, clip 1.0, seeded by the seed), for N
steps; everything else (mixture, lr grid on seed 0's validation, seeds, steps, metrics, targets) is as above.

    python benchmarks/colm.py --warm-start-steps 1000 --name colm_finetune
"""
import argparse
import csv
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402


NAME = "colm"
ARMS = ("random-b", "random-2b", "colm")
# Post-hoc ablations (not part of the pre-registered protocol): ``colm-random`` keeps CoLM's small-source rule and
# budgets but draws uniformly within each large source (`--arms colm-random --name colm_ablation`); ``colm-nokeep``
# runs facility location on every source, none kept whole (`--arms colm-nokeep --name colm_ablation_nokeep`);
# ``colm-uniform-weights`` is CoLM with medoid_weights="uniform" (count / budget per medoid instead of its cluster
# size; `--arms colm-uniform-weights --name colm_ablation_uniform_weights`); ``colm-equal-weights`` is CoLM with
# medoid_weights="equal" (the coreset trained as a plain mini-batch, the official code's default;
# `--arms colm-equal-weights --name colm_ablation_equal_weights`); ``colm-backprop`` is CoLM on the exact
# per-example gradients of the same block instead of one zeroth-order direction (features="backprop"; `--arms
# colm-backprop --name colm_ablation_backprop`).
MEDOID_WEIGHT_ARMS = {"colm-uniform-weights": "uniform", "colm-equal-weights": "equal"}
FEATURE_ARMS = {"colm-backprop": "backprop"}
ABLATIONS = ("colm-random", "colm-nokeep", *MEDOID_WEIGHT_ARMS, *FEATURE_ARMS)
SOURCES = ("sst2", "commonsense", "shakespeare", "mmlu")
MIXTURE = {"sst2": 0.60, "commonsense": 0.25, "shakespeare": 0.10, "mmlu": 0.05}
LR_GRID = (1e-3, 3e-3)
DATA = common.REPO_ROOT / "data"
PRETRAIN_TEXT = DATA / "main_job" / "wikitext2_train.txt"
PAD = 0  # byte 0 never occurs in the texts


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS + ABLATIONS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="b; the large batch is 2b")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--heldout", type=int, default=96)
    parser.add_argument("--lr", type=float, default=None, help="skip the lr choice and use this lr for every arm")
    parser.add_argument("--warm-start-steps", type=int, default=0,
                        help="pre-train every seed's model this many steps on WikiText-2 first (fine-tuning protocol)")
    parser.add_argument("--matching-every", type=int, default=50)
    parser.add_argument("--time-rounds", type=int, default=15)
    parser.add_argument("--out-dir", default=str(common.DEFAULT_OUT_DIR))
    parser.add_argument("--name", default=NAME)
    return parser.parse_args(argv)


# -- data ---------------------------------------------------------------------------------------------------
def _question(record: dict) -> str:
    text = record["instruction"].split("\n")[0]
    return text.split(": ", 1)[1] if ": " in text else text


def source_texts() -> dict:
    """Per source: (training pool, held-out pool) of texts."""
    sst2 = [json.loads(line)["sentence"] for line in (DATA / "glue/sst2/train.jsonl").read_text().splitlines()]
    sst2_dev = [json.loads(line)["sentence"] for line in (DATA / "glue/sst2/validation.jsonl").read_text()
                .splitlines()]
    commonsense = [_question(r) for r in json.loads((DATA / "commonsense/train_mix.json").read_text())]
    lines = {split: [line for line in (DATA / f"text/tinyshakespeare/{split}.txt").read_text().splitlines()
                     if len(line) >= 20] for split in ("train", "val")}

    def mmlu(split):
        with open(DATA / f"mmlu/{split}.csv", newline="") as f:
            return [row["question"] for row in csv.DictReader(f)]

    return {"sst2": (sst2, sst2_dev), "commonsense": (commonsense[:-400], commonsense[-400:]),
            "shakespeare": (lines["train"], lines["val"]), "mmlu": (mmlu("test"), mmlu("val"))}


def encode(text: str, seq: int) -> dict:
    ids = list(text.encode("utf-8")[:seq])
    pad = seq - len(ids)
    return {"input_ids": torch.tensor(ids + [PAD] * pad), "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
            "labels": torch.tensor(ids + [-100] * pad)}


def build_data(train_size: int, heldout: int, seq: int):
    """(training examples with a "source", {source: validation batch}, {source: test batch})."""
    rng = random.Random(1234)
    texts = source_texts()
    train, validation, test = [], {}, {}
    for source in SOURCES:
        pool, held = texts[source]
        held = list(held)
        rng.shuffle(held)
        if len(held) < 2 * heldout:
            raise ValueError(f"{source}: only {len(held)} held-out texts for 2 x {heldout}.")
        for split, chunk in ((validation, held[:heldout]), (test, held[heldout:2 * heldout])):
            encoded = [encode(t, seq) for t in chunk]
            split[source] = {k: torch.stack([e[k] for e in encoded]) for k in encoded[0]}
        count = round(MIXTURE[source] * train_size)
        picks = rng.sample(pool, count) if count <= len(pool) else [rng.choice(pool) for _ in range(count)]
        train += [{**encode(t, seq), "source": source} for t in picks]
    rng.shuffle(train)
    return train, validation, test


# -- runs ---------------------------------------------------------------------------------------------------
def build_model(seed: int):
    return common.build_llama(hidden=64, intermediate=128, heads=4, layers=4, vocab=256, seed=seed,
                              max_positions=128)


_PRETRAINED: dict = {}  # (seed, steps, batch, seq) -> state dict of the warm-started model


def pretrain(seed: int, steps: int, batch: int, seq: int) -> dict:
    """State dict of ``build_model(seed)`` after ``steps`` AdamW steps on random WikiText-2 byte windows."""
    key = (seed, steps, batch, seq)
    if key not in _PRETRAINED:
        data = torch.tensor(list(PRETRAIN_TEXT.read_bytes()), dtype=torch.long)
        model = build_model(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        warmup = max(1, steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: min((t + 1) / warmup, max(0.0, (steps - t) / max(1, steps - warmup))))
        generator = torch.Generator().manual_seed(10_000 + seed)
        for _ in range(steps):
            starts = torch.randint(0, len(data) - seq, (batch,), generator=generator)
            ids = torch.stack([data[s:s + seq] for s in starts.tolist()])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        print(json.dumps({"pretrain_seed": seed, "steps": steps, "final_loss": float(loss.detach())}), flush=True)
        _PRETRAINED[key] = model.state_dict()  # the model is dropped here, so its tensors are not shared
    return _PRETRAINED[key]


def initial_model(seed: int, args):
    """The model every arm of ``seed`` starts from: random init, or warm-started (``--warm-start-steps``)."""
    model = build_model(seed)
    if args.warm_start_steps:
        model.load_state_dict(pretrain(seed, args.warm_start_steps, args.batch, args.seq))
    return model


def make_trainer(arm: str, seed: int, lr: float, args, train, steps: int, output_dir: str):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_lowrank.colm import CoLMConfig, CoLMTrainer

    batch = args.batch * (1 if arm == "random-b" else 2)
    training_args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=max(1, steps // 20), weight_decay=0.0, seed=seed,
        data_seed=seed, logging_steps=max(1, steps // 10), report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_drop_last=True)
    model = initial_model(seed, args)
    if arm.startswith("colm"):
        keep = {"small_sources": []} if arm == "colm-nokeep" else {"small_source_fraction": 0.15}
        config = CoLMConfig(coreset_ratio=0.5, **keep, seed=seed,
                            matching_every=args.matching_every,
                            selection="random" if arm == "colm-random" else "facility_location",
                            medoid_weights=MEDOID_WEIGHT_ARMS.get(arm, "cluster"),
                            features=FEATURE_ARMS.get(arm, "zeroth_order"))
        return CoLMTrainer(model=model, args=training_args, colm_config=config, train_dataset=train,
                           data_collator=default_data_collator)
    plain = [{k: v for k, v in e.items() if k != "source"} for e in train]
    return Trainer(model=model, args=training_args, train_dataset=plain, data_collator=default_data_collator)


@torch.no_grad()
def evaluate(model, heldout: dict) -> dict:
    from hf_lowrank.colm.features import per_example_loss

    model.eval()
    losses = {}
    for source, batch in heldout.items():
        total, count = 0.0, 0
        for start in range(0, len(batch["labels"]), 32):
            part = {k: v[start:start + 32] for k, v in batch.items()}
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            sums, counts = per_example_loss(logits, part["labels"])
            total, count = total + float(sums.sum()), count + int(counts.sum())
        losses[source] = total / count
    losses["overall"] = sum(MIXTURE[s] * losses[s] for s in SOURCES)
    model.train()
    return losses


def run(arm, seed, lr, args, data, heldout, tmp):
    trainer = make_trainer(arm, seed, lr, args, data, args.steps, f"{tmp}/{arm}-{seed}")
    start = time.perf_counter()
    trainer.train()
    result = {"arm": arm, "seed": seed, "lr": lr, "train_seconds": time.perf_counter() - start,
              **evaluate(trainer.model, heldout)}
    logs = [entry for entry in trainer.state.log_history if "colm/matching_cosine" in entry]
    if logs:
        result["matching_cosine"] = statistics.fmean(e["colm/matching_cosine"] for e in logs)
        result["matching_cosine_random"] = statistics.fmean(e["colm/matching_cosine_random"] for e in logs)
        result["selection_seconds"] = statistics.fmean(e["colm/selection_seconds"] for e in logs)
        result["coverage"] = {s: statistics.fmean(e[f"colm/coverage/{s}"] for e in trainer.state.log_history
                                                  if f"colm/coverage/{s}" in e) for s in SOURCES}
    print(json.dumps({k: v for k, v in result.items()}), flush=True)
    return result


def peak_memory(arm, args, data, tmp) -> int:
    """Peak live-tensor bytes over 3 training steps (MemTracker sees every tensor the steps allocate)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import TrainerCallback

    trainer = make_trainer(arm, 0, 1e-3, args, data, 3, f"{tmp}/mem-{arm}")
    tracker = MemTracker()
    model = trainer.model

    def reset(module, inputs):  # several forwards per step (selection, matching): one module stat per forward
        if module is model:
            tracker.reset_mod_stats()

    class Reset(TrainerCallback):
        def on_step_end(self, *a, **k):
            tracker.reset_mod_stats()

    trainer.add_callback(Reset())
    hook = torch.nn.modules.module.register_module_forward_pre_hook(reset)
    tracker.track_external(model)
    try:
        with tracker:
            trainer.train()
    finally:
        hook.remove()
    return int(sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values()))


def step_times(args, data, tmp) -> dict:
    """Median seconds of one training step (forward, backward, optimizer; selection for colm), interleaved."""
    trainers, batches, fns = {}, {}, {}
    for arm in args.arms:
        trainer = make_trainer(arm, 0, 1e-3, args, data, 1000, f"{tmp}/time-{arm}")
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not used here
        trainers[arm] = trainer
        batches[arm] = next(iter(trainer.get_train_dataloader()))

        def step(trainer=trainer, batch=batches[arm]):
            trainer.training_step(trainer.model, dict(batch))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()

        fns[arm] = step
    records = common.interleaved_times(fns, repeats=args.time_rounds, warmup=2)
    return {arm: common.median([r["total"] for r in records[arm]]) for arm in args.arms}


# -- report -------------------------------------------------------------------------------------------------
def summarize(results, memory, times, lrs, args) -> tuple[str, dict]:
    rows, means = [], {}
    for arm in args.arms:
        mine = [r for r in results if r["arm"] == arm]
        means[arm] = {key: statistics.fmean(r[key] for r in mine) for key in (*SOURCES, "overall")}
        sd = statistics.stdev(r["overall"] for r in mine) if len(mine) > 1 else 0.0
        cells = [f"{means[arm][s]:.4f}" for s in SOURCES]
        rows.append([arm, f"{lrs[arm]:g}", *cells, f"{means[arm]['overall']:.4f} ± {sd:.4f}",
                     common.format_bytes(memory[arm]) if arm in memory else "-",
                     f"{memory[arm] / memory['random-b']:.3f}" if arm in memory and "random-b" in memory else "-",
                     f"{times[arm] / times['random-b']:.2f}" if arm in times and "random-b" in times else "-"])
    table = common.markdown_table(
        ["arm", "lr", *[f"{s} test loss" for s in SOURCES], "overall (mean ± sd)", "peak tensor memory",
         "x random-b", "step time x random-b"], rows)
    start = (f", fine-tuned from {args.warm_start_steps} WikiText-2 pre-training steps" if args.warm_start_steps
             else ", from random init")
    title = f"# CoLM vs random mini-batches ({len(args.seeds)} seeds, {args.steps} steps, b = {args.batch}{start})"
    lines = [title, "",
             "Command: `python benchmarks/colm.py " + " ".join(sys.argv[1:]) + "`", "", table, ""]
    verdict = {}
    if {"colm", "random-b", "random-2b"} <= set(means):
        colm, small, large = means["colm"], means["random-b"], means["random-2b"]
        verdict["colm <= random-b on every source"] = all(colm[s] <= small[s] for s in (*SOURCES, "overall"))
        verdict["colm overall / random-2b overall"] = colm["overall"] / large["overall"]
        verdict["within 2% of random-2b"] = colm["overall"] <= 1.02 * large["overall"]
        if memory:
            verdict["colm peak / random-b peak"] = memory["colm"] / memory["random-b"]
            verdict["random-2b peak / random-b peak"] = memory["random-2b"] / memory["random-b"]
            verdict["peak memory at the b level (<= 1.10)"] = memory["colm"] / memory["random-b"] <= 1.10
        lines += ["Targets:", ""] + [f"- {k}: {v if isinstance(v, bool) else f'{v:.4f}'}" for k, v in verdict.items()]
    for arm in (a for a in args.arms if a.startswith("colm")):
        colm_runs = [r for r in results if r["arm"] == arm]
        mean = lambda key: statistics.fmean(r[key] for r in colm_runs)  # noqa: E731
        coverage = {s: statistics.fmean(r["coverage"][s] for r in colm_runs) for s in SOURCES}
        lines += ["", f"{arm} diagnostics (mean over seeds): gradient-matching cosine with the full 2b batch "
                      f"{mean('matching_cosine'):.3f} (a uniform random b-subset: "
                      f"{mean('matching_cosine_random'):.3f});"
                      f" selection {1000 * mean('selection_seconds'):.1f} ms per step; share of each source's "
                      "examples trained on: " + ", ".join(f"{s} {c:.2f}" for s, c in coverage.items()) + "."]
    lines += ["", "Per run:", "", common.markdown_table(
        ["arm", "seed", "lr", *SOURCES, "overall"],
        [[r["arm"], r["seed"], f"{r['lr']:g}", *[f"{r[s]:.4f}" for s in SOURCES], f"{r['overall']:.4f}"]
         for r in results])]
    return "\n".join(lines), verdict


def figure(results, args):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    keys = (*SOURCES, "overall")
    width = 0.8 / len(args.arms)
    for i, arm in enumerate(args.arms):
        mine = [r for r in results if r["arm"] == arm]
        ax.bar([k + i * width for k in range(len(keys))], [statistics.fmean(r[key] for r in mine) for key in keys],
               width, label=arm, yerr=[statistics.stdev(r[key] for r in mine) if len(mine) > 1 else 0 for key in keys])
    ax.set_xticks([k + width * (len(args.arms) - 1) / 2 for k in range(len(keys))], keys)
    ax.set_ylabel("test loss (bytes, nats)")
    ax.set_ylim(bottom=min(statistics.fmean(r[k] for r in results) for k in keys) * 0.8)
    ax.set_title(f"CoLM b-of-2b vs random b / 2b ({len(args.seeds)} seeds)")
    ax.legend()
    return fig


def main(argv=None):
    import tempfile

    args = parse_args(argv)
    common.setup_environment(threads=1)
    train, validation, test = build_data(args.train_size, args.heldout, args.seq)
    results, lrs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in args.arms:
            if args.lr is not None:
                lrs[arm] = args.lr
                continue
            scores = {lr: run(arm, 0, lr, args, train, validation, tmp)["overall"] for lr in LR_GRID}
            lrs[arm] = min(scores, key=scores.get)
            print(f"{arm}: validation loss {scores} -> lr {lrs[arm]:g}", flush=True)
        for seed in args.seeds:
            for arm in args.arms:
                results.append(run(arm, seed, lrs[arm], args, train, test, tmp))
        memory = {arm: peak_memory(arm, args, train, tmp) for arm in args.arms}
        times = step_times(args, train, tmp)
    markdown, verdict = summarize(results, memory, times, lrs, args)
    common.write_results(args.name, args.out_dir, markdown, figure(results, args))
    (Path(args.out_dir) / f"{args.name}.json").write_text(json.dumps(
        {"args": vars(args), "lrs": lrs, "results": results, "peak_memory_bytes": memory,
         "step_time_median_s": times, "verdict": {k: bool(v) if isinstance(v, bool) else v
                                                  for k, v in verdict.items()}}, indent=1))
    print(markdown)


if __name__ == "__main__":
    main()
