"""Commonsense reasoning (LLM-Adapters protocol): fine-tune on the commonsense mix, evaluate the 8 tasks.

    accelerate launch recipes/commonsense.py --config recipes/configs/commonsense/smollm2_galore.yaml max_steps=100
    hf-lowrank train recipes/configs/commonsense/smollm2_galore.yaml eval_mode=generate

Records are LLM-Adapters JSON: {"instruction", "input", "output": "the correct answer is <label>",
"answer": "<label>"}; the instruction lists the options and ends in "Answer format: label1/label2/...". Prompts use
the Alpaca template LLM-Adapters trains with (without the 16-space indentation its source accidentally carries).
``eval_mode``:

* ``harness`` (default): lm-evaluation-harness (``recipes/harness.py``, the ``[eval]`` extra): the harness's own
  task definitions (prompts, choices, acc / acc_norm) on the same records, ``num_fewshot`` shots drawn from the
  other test records; the protocol Q-GaLore, OwLore and LISA report with. It replaced our hand-written zero-shot
  scorer, which disagreed with the harness by more than 0.5 points per task (benchmarks/results/scorer_agreement.md);
* ``loglik``: LLM-Adapters' label protocol without decoding errors: score "the correct answer is <label>" for every
  label of the answer format after the Alpaca prompt, pick the most likely (one forward pass per example);
* ``generate``: LLM-Adapters' own evaluation: decode (greedy, or ``num_beams``) and take the first label the
  answer-pattern regex finds (no match counts as wrong).

Offline data (data/commonsense/): test subsets of BoolQ, PIQA, SIQA, ARC-e, ARC-c and a training mix of BoolQ, SIQA,
ARC-e, ARC-c; HellaSwag, WinoGrande and OBQA run when given by ``data_files.<task>=test.json`` or
``eval_dataset_names.<task>=<hub id>``. Training data: ``data_files.train=`` (e.g. commonsense_170k.json) or
``dataset_name=<hub id>``.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import models  # noqa: E402
import scoring  # noqa: E402


SHIPPED_DATA = Path(__file__).resolve().parents[1] / "data" / "commonsense"
SHIPPED_TRAIN = SHIPPED_DATA / "train_mix.json"
# LLM-Adapters dataset folder name -> metric name in results.
TASKS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "siqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "ARC-Easy": "arc_e",
    "ARC-Challenge": "arc_c",
    "openbookqa": "obqa",
}
SHIPPED_TASKS = ["boolq", "piqa", "social_i_qa", "ARC-Easy", "ARC-Challenge"]
# LLM-Adapters' extract_answer patterns (commonsense_evaluate.py); other tasks use their answer-format labels.
ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
ANSWER_PREFIX = "the correct answer is"
EVAL_MODES = ("harness", "loglik", "generate")
DEFAULT_EVAL_MODE = "harness"
EVAL_PROTOCOLS = {  # what the numbers of each eval_mode mean (results JSON "eval_protocol")
    "harness": "lm-evaluation-harness 0.4.13 task definitions; metrics = acc, harness_metrics = acc and acc_norm",
    "loglik": "LLM-Adapters label protocol, most likely 'the correct answer is <label>' after the Alpaca prompt",
    "generate": "LLM-Adapters protocol, first answer label in the generated response",
}


# ---------------------------------------------------------------------------------------------------------------
# Prompts and parsing
# ---------------------------------------------------------------------------------------------------------------
def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """LLM-Adapters' Alpaca template up to the response (the training target follows directly)."""
    if input_text:
        return ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def answer_labels(instruction: str) -> list[str]:
    """Labels of the "Answer format: a/b/c" line, e.g. ['answer1', 'answer2', 'answer3']."""
    match = re.search(r"Answer format:\s*(\S+)", instruction)
    if match is None:
        raise ValueError(f"instruction has no 'Answer format: ...' line: {instruction[-120:]!r}")
    return match.group(1).split("/")


def split_options(instruction: str) -> tuple[str, list[str]]:
    """(question, option texts) of an LLM-Adapters instruction; BoolQ (true/false) has no option texts."""
    labels = answer_labels(instruction)
    end = instruction.index("Answer format:")
    head_end = instruction.index(": ") + 2 if ": " in instruction[:end] else 0
    if labels == ["true", "false"]:
        return instruction[head_end:end].strip(), []
    starts = []
    for label in labels:
        marker = re.search(re.escape(label) + ":", instruction[:end], flags=re.IGNORECASE)
        if marker is None:
            raise ValueError(f"option {label!r} of the answer format is not listed in: {instruction[:200]!r}...")
        starts.append((marker.start(), marker.end()))
    question = instruction[head_end: starts[0][0]].strip()
    bounds = [s for _, s in starts]
    ends = [b for b, _ in starts[1:]] + [end]
    return question, [instruction[b:e].strip() for b, e in zip(bounds, ends)]


def extract_answer(task: str, text: str, labels: list[str]) -> str:
    """First label the LLM-Adapters pattern finds in generated `text` ('' when none)."""
    pattern = ANSWER_PATTERNS.get(task) or "|".join(map(re.escape, labels))
    found = re.findall(pattern, text.strip())
    return found[0] if found else ""


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
REQUIRED_KEYS = ("instruction", "output", "answer")


def read_records(path) -> list[dict]:
    """LLM-Adapters records from a .json list or .jsonl file, checked for the required keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"commonsense data file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else json.loads(text)
    for index, record in enumerate(records):
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"{path} record {index} lacks {missing}; LLM-Adapters records need {REQUIRED_KEYS}.")
    return records


def _from_hub(name: str, split: str) -> list[dict]:
    from datasets import load_dataset

    return [dict(r) for r in load_dataset(name, split=split)]


def task_source(cfg: "CommonsenseConfig", task: str) -> Optional[str]:
    if cfg.data_files and task in cfg.data_files:
        return str(cfg.data_files[task])
    if task in cfg.eval_dataset_names:
        return f"hub:{cfg.eval_dataset_names[task]}"
    shipped = SHIPPED_DATA / task / "test.json"
    return str(shipped) if shipped.is_file() else None


def load_task(cfg: "CommonsenseConfig", task: str) -> list[dict]:
    source = task_source(cfg, task)
    records = _from_hub(source[4:], "test") if source.startswith("hub:") else read_records(source)
    return records if cfg.max_eval_samples is None else records[: cfg.max_eval_samples]


def load_train(cfg: "CommonsenseConfig") -> list[dict]:
    if cfg.data_files and "train" in cfg.data_files:
        records = read_records(cfg.data_files["train"])
    elif cfg.dataset_name:
        records = _from_hub(cfg.dataset_name, "train")
    else:
        records = read_records(SHIPPED_TRAIN)
    return records if cfg.max_train_samples is None else records[: cfg.max_train_samples]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def predict_task(model, tokenizer, task: str, records: list[dict], eval_mode: str = "loglik",
                 batch_size: int = 8, max_new_tokens: int = 32, num_beams: int = 1,
                 progress: bool = False) -> list[str]:
    """Predicted label for each record under LLM-Adapters' label protocol (`eval_mode` loglik or generate)."""
    labels = [answer_labels(r["instruction"]) for r in records]
    prompts = [alpaca_prompt(r["instruction"], r.get("input", "")) for r in records]
    if eval_mode == "generate":
        outputs = scoring.generate_answers(model, tokenizer, prompts, max_new_tokens, num_beams, batch_size, progress)
        return [extract_answer(task, out, lab) for out, lab in zip(outputs, labels)]
    if eval_mode != "loglik":
        raise ValueError(f"`eval_mode` must be 'loglik' or 'generate' here (harness: evaluate()), got {eval_mode!r}.")
    contexts = [p + ANSWER_PREFIX for p in prompts]
    candidates = [[f" {label}" for label in lab] for lab in labels]
    scores = scoring.score_continuations(model, tokenizer, contexts, candidates, batch_size, progress=progress)
    return [lab[scoring.pick(s)] for lab, s in zip(labels, scores)]


def harness_metrics(model, tokenizer, tasks: dict[str, list[dict]], num_fewshot: int = 0, batch_size: int = 8,
                    progress: bool = False) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness metrics per task (metric names of TASKS): acc, acc_norm, n."""
    import harness

    _check_nonempty(tasks)
    configs = {task: [harness.commonsense_config(task, records, source=task)] for task, records in tasks.items()}
    details = harness.run_configs(model, tokenizer, configs, num_fewshot=num_fewshot, batch_size=batch_size,
                                  progress=progress)
    return {TASKS[task]: details[task] for task in tasks}


def _check_nonempty(tasks: dict[str, list[dict]]) -> None:
    for task, records in tasks.items():
        if not records:
            raise ValueError(f"task {task!r} has no test records.")


def _with_average(metrics: dict[str, float]) -> dict[str, float]:
    return {**metrics, "average": sum(metrics.values()) / len(metrics)}


def evaluate(model, tokenizer, tasks: dict[str, list[dict]], eval_mode: str = "harness", num_fewshot: int = 0,
             batch_size: int = 8, max_new_tokens: int = 32, num_beams: int = 1,
             progress: bool = False) -> dict[str, float]:
    """Accuracy per task (metric names of TASKS) and their unweighted average: the harness's acc
    (:func:`harness_metrics` has acc_norm too), or the LLM-Adapters label protocols (`max_new_tokens` and
    `num_beams` set the decoding of ``generate``)."""
    if eval_mode == "harness":
        details = harness_metrics(model, tokenizer, tasks, num_fewshot, batch_size, progress)
        return _with_average({task: values["acc"] for task, values in details.items()})
    _check_nonempty(tasks)
    metrics = {}
    for task, records in tasks.items():
        predictions = predict_task(model, tokenizer, task, records, eval_mode, batch_size, max_new_tokens, num_beams,
                                   progress)
        metrics[TASKS[task]] = sum(p == r["answer"] for p, r in zip(predictions, records)) / len(records)
    return _with_average(metrics)


# ---------------------------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CommonsenseConfig(common.RecipeConfig):
    recipe: str = field(default="commonsense", metadata={"help": "Recipe script this config is for."})
    task: str = field(default="commonsense", metadata={"help": "Results name of the task."})
    model_name_or_path: str = field(
        default=models.SMOLLM2_ALIAS,
        metadata={"help": f"Causal LM: '{models.SMOLLM2_ALIAS}' (offline GGUF), a local folder or a Hub id."},
    )
    tasks: Any = field(
        default_factory=lambda: list(SHIPPED_TASKS),
        metadata={"help": f"Tasks to evaluate (LLM-Adapters names): {', '.join(TASKS)}."},
    )
    eval_mode: str = field(default=DEFAULT_EVAL_MODE, metadata={"help": f"Scoring: {', '.join(EVAL_MODES)}."})
    num_fewshot: int = field(
        default=0, metadata={"help": "Solved examples in each prompt (eval_mode=harness; drawn from the other test "
                                     "records)."})
    eval_dataset_names: dict = field(
        default_factory=dict, metadata={"help": "Hub datasets (LLM-Adapters format, split test) per task."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Generated tokens in eval_mode=generate."})
    num_beams: int = field(default=1, metadata={"help": "Beams in eval_mode=generate (LLM-Adapters uses 4)."})
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Also train on prompt tokens (LLM-Adapters' default is true)."}
    )
    target_modules: Any = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers to project / adapt (attention + MLP, as GaLore/OwLore do)."},
    )

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"Unknown or empty `tasks` {unknown or self.tasks}. Valid tasks: {', '.join(TASKS)}.")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"`eval_mode` must be one of {', '.join(EVAL_MODES)}, got {self.eval_mode!r}.")
        if self.num_fewshot < 0 or (self.num_fewshot and self.eval_mode != "harness"):
            raise ValueError(f"`num_fewshot={self.num_fewshot}` needs a count >= 0 and eval_mode=harness (the "
                             f"LLM-Adapters modes are zero-shot); eval_mode is {self.eval_mode!r}.")
        missing = [t for t in self.tasks if task_source(self, t) is None]
        if missing:
            raise ValueError(
                f"No test data for {missing}: only {', '.join(SHIPPED_TASKS)} ship offline. Pass "
                + " ".join(f"data_files.{t}=<test.json>" for t in missing)
                + " (LLM-Adapters format) or eval_dataset_names.<task>=<hub id>, or drop them from `tasks`."
            )
        if self.data_files:
            for key, path in self.data_files.items():
                if key not in TASKS and key != "train":
                    raise ValueError(f"data_files key {key!r} is neither 'train' nor a task ({', '.join(TASKS)}).")
                if not Path(path).is_file():
                    raise FileNotFoundError(f"data_files.{key}: file {path!r} does not exist.")
        super().__post_init__()

    def run_name_parts(self) -> list[str]:
        """The common parts with the task set (a short stable tag), the evaluation protocol when it is not the
        default, and ``zeroshot`` / ``fewshot<k>`` for evaluation-only runs (``<k>shot`` after the budget of trained
        runs with shots)."""
        parts = super().run_name_parts()
        if not self.do_train:
            parts[1] = scoring.shots_label(self.num_fewshot)
        elif self.num_fewshot:
            parts.insert(-1, f"{self.num_fewshot}shot")
        protocol = [] if self.eval_mode == DEFAULT_EVAL_MODE else [self.eval_mode]
        return [*parts[:-1], scoring.set_tag([TASKS[t] for t in self.tasks]), *protocol, parts[-1]]


def training_dataset(records: list[dict], tokenizer, cfg: CommonsenseConfig):
    from datasets import Dataset

    return Dataset.from_list([
        models.supervised_features(tokenizer, alpaca_prompt(r["instruction"], r.get("input", "")), r["output"],
                                   cfg.max_seq_length, cfg.train_on_inputs)
        for r in records
    ])


def main(argv=None) -> dict:
    from transformers import DataCollatorForSeq2Seq, set_seed

    cfg = common.parse_args(CommonsenseConfig, argv, recipe="commonsense")
    with common.recording_errors(cfg):
        common.check_mode(cfg.mode)
        set_seed(cfg.seed)
        test_sets = {task: load_task(cfg, task) for task in cfg.tasks}
        train_records = load_train(cfg) if cfg.do_train else []
        model, tokenizer = models.load_causal_lm(cfg.model_name_or_path)
        train_dataset = training_dataset(train_records, tokenizer, cfg) if cfg.do_train else None
        model, optimizer_spec = common.build_optimizer(model, cfg, task_type="CAUSAL_LM")
        trainer, meter = common.fit(
            cfg, model, optimizer_spec, train_dataset, DataCollatorForSeq2Seq(tokenizer, padding=True),
            processing_class=tokenizer,
        )
        details = {}
        if cfg.eval_mode == "harness":
            details = harness_metrics(trainer.model, tokenizer, test_sets, cfg.num_fewshot, cfg.eval_batch_size,
                                      cfg.progress)
            metrics = _with_average({task: values["acc"] for task, values in details.items()})
        else:
            metrics = evaluate(trainer.model, tokenizer, test_sets, eval_mode=cfg.eval_mode,
                               batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                               num_beams=cfg.num_beams, progress=cfg.progress)
    common.logger.warning(f"{cfg.run_name}: {metrics}")
    if trainer.is_world_process_zero():
        common.write_results(
            cfg, metrics, meter=meter, model=model, optimizer=trainer.optimizer, main_metric="average",
            examples_per_step=common.examples_per_step(cfg, trainer),
            extra={"eval_mode": cfg.eval_mode, "eval_protocol": EVAL_PROTOCOLS[cfg.eval_mode],
                   "num_fewshot": cfg.num_fewshot, "limit": cfg.max_eval_samples,
                   "num_eval_examples": {t: len(r) for t, r in test_sets.items()},
                   **({"harness_metrics": details} if details else {})},
        )
        if cfg.do_train and (cfg.save_model or cfg.push_to_hub):
            from hf_lowrank import hub

            hub.save_pretrained(trainer.model, cfg.output_dir, tokenizer=tokenizer, results=common.results_path(cfg))
            if cfg.push_to_hub:
                hub.push_to_hub(cfg.output_dir, cfg.hub_model_id)
    return metrics


if __name__ == "__main__":
    common.run_script(main)
