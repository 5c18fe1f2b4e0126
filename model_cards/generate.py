"""Regenerate model_cards/: one Hub card per method, from the GLUE benchmark's results.

    python model_cards/generate.py                 # writes model_cards/<mode>.md from benchmarks/results/glue.json
    python model_cards/generate.py --check         # exit 1 when a committed card differs from what this writes

Each card is rendered by :func:`hf_lowrank.hub.render_benchmark_card` from the benchmark record (mean GLUE dev score
per task over the seeds, the learning rate each score was selected at, optimizer state, trainable parameters,
step-time ratio, the commands and the package versions the benchmark recorded) and the arm's recipe config
(recipes/configs/glue/minilm_<mode>.yaml) for its other hyper-parameters. Nothing else enters a card, so
tests/test_hub.py can check that the committed cards are exactly what the results give.
"""
import argparse
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
OUT = ROOT / "model_cards"
RESULTS = ROOT / "benchmarks" / "results" / "glue.json"
CONFIGS = ROOT / "recipes" / "configs" / "glue"
HYPER = {  # recipe keys each arm's card lists (the learning rate is listed per task)
    "adamw": (),
    "galore": ("rank", "scale", "update_proj_gap", "proj_type"),
    "lora": ("lora_r", "lora_alpha", "lora_dropout"),
    "gradnormlorp": ("rank", "scale", "update_proj_gap", "proj_type"),
    "welore": ("welore_rank_reduction",),
}


def arm_config(mode: str, task: str):
    import common
    import glue

    return common.load_config(glue.GlueConfig, CONFIGS / f"minilm_{mode}.yaml", [f"task={task}"])


def cards(results_path: Path = RESULTS) -> dict[str, str]:
    """{file name: card text} for every arm of the benchmark record."""
    from hf_lowrank import hub

    record = json.loads(results_path.read_text())
    tasks, selected = record["tasks"], record["selected"]
    arms = [a for a in HYPER if all(a in selected[t] for t in tasks)]
    texts = {}
    for mode in arms:
        scores = []
        for task, info in tasks.items():
            row, full = selected[task][mode], selected[task]["adamw"]
            learned = row["dev"] > info["constant_dev"] + 2.0
            note = f"best constant prediction {info['constant_dev']:.2f}" + ("" if learned else ", **not learned**")
            if mode != "adamw":
                note = f"{row['dev'] - full['dev']:+.2f} vs full fine-tuning; " + note
            scores.append(hub.BenchmarkScore(task, info["metric"], row["dev"] / 100,
                                             tuple(v / 100 for v in row["dev_seeds"]), "validation", note))
        first = arm_config(mode, next(iter(tasks)))
        settings = {t: i["settings"] for t, i in tasks.items()}
        hyper = [("learning rate", ", ".join(f"{t} {selected[t][mode]['lr']:g}" for t in tasks))]
        hyper += [(key, getattr(first, key)) for key in HYPER[mode]]
        hyper += [("target_modules", first.target_modules), ("batch_size", first.batch_size),
                  ("steps", ", ".join(f"{t} {s['steps']}" for t, s in settings.items())),
                  ("max_seq_length", ", ".join(f"{t} {s['max_seq_length']}" for t, s in settings.items())),
                  ("warmup_ratio", first.warmup_ratio),
                  ("seeds", ", ".join(map(str, tasks[next(iter(tasks))]["seeds"])))]
        row = selected[next(iter(tasks))][mode]
        ratio = record["step_time_ratio_median"].get(mode)
        resources = [("optimizer state", f"{row['state_bytes'] / 2**20:.1f} MB"),
                     ("trainable parameters", f"{row['trainable']:,}"),
                     ("median step time / full fine-tuning", f"{ratio:.2f} (all arms stepped side by side, 1 thread)"
                      if ratio else "n/a")]
        details = [f"- Config: `recipes/configs/glue/minilm_{mode}.yaml` (per-task values in its `task_overrides`)",
                   "- Scores: complete GLUE dev sets; train on the shipped train sets less a 100-row validation "
                   "slice (`data/glue/`); protocol in `benchmarks/glue.py`, full table in "
                   "`benchmarks/results/glue.md`"]
        card = hub.render_benchmark_card(
            mode, scores, title=f"hf_lowrank {mode} on GLUE (MiniLM-L6)", base_model=first.model_name_or_path,
            dataset="nyu-mll/glue", recipe="glue", hyperparameters=hyper, resources=resources, details=details,
            command="\n".join(c for c in record["commands"] if c), versions=record["meta"]["versions"],
            git_sha=record["meta"]["git_sha"])
        hub.validate_card(card)
        texts[f"{mode}.md"] = str(card) + "\n"
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the cards in --out, write nothing")
    args = parser.parse_args(argv)
    texts = cards(args.results)
    if args.check:
        stale = [n for n, t in texts.items() if not (args.out / n).is_file() or (args.out / n).read_text() != t]
        extra = sorted(p.name for p in args.out.glob("*.md") if p.name not in texts and p.name != "README.md")
        for name in stale + extra:
            print(f"{args.out / name}: differs from `python model_cards/generate.py`", file=sys.stderr)
        return 1 if stale or extra else 0
    for name, text in texts.items():
        (args.out / name).write_text(text)
        print(f"Wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
