"""MMLU: 0-shot / k-shot multiple choice over the 57 subjects, optionally after fine-tuning with any optimizer mode.

    accelerate launch recipes/mmlu.py --config recipes/configs/mmlu/smollm2_galore.yaml max_steps=100
    hf-lowrank train recipes/configs/mmlu/smollm2_galore.yaml num_fewshot=0

Prompt (Hendrycks et al. / lm-evaluation-harness): "The following are multiple choice questions (with answers)
about {subject}.\\n\\n", then ``num_fewshot`` solved questions from the subject's dev split, then the question as
"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:". The prediction is the letter among " A"/" B"/" C"/" D" with the
highest next-token log-likelihood; shots are dropped from the end when the prompt exceeds ``max_eval_length``.
Reported: macro accuracy (mean over subjects, the usual MMLU number), micro accuracy and per-subject accuracy.
``eval_mode=letter`` (default) scores with our light scorer, which gives lm-evaluation-harness's MMLU accuracy on
the same questions (24.1% = 24.1% for SmolLM2-135M, 228 questions: benchmarks/results/scorer_agreement.md);
``eval_mode=harness`` runs the harness's MMLU definition itself (``recipes/harness.py``, the ``[eval]`` extra).

Fine-tuning (as in Q-GaLore's MMLU experiments, which train on the auxiliary train set) uses ``train_split``:
offline, the shipped pre-release MMLU val pool (data/mmlu/val.csv, see data/mmlu/README.md), never the test set.
Data: the shipped subsets by default, ``data_files.<split>=...`` for local CSVs, ``dataset_name=cais/mmlu`` online.
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import models  # noqa: E402
import scoring  # noqa: E402


SHIPPED_DATA = Path(__file__).resolve().parents[1] / "data" / "mmlu"
EVAL_MODES = ("letter", "harness")
DEFAULT_EVAL_MODE = "letter"
EVAL_PROTOCOLS = {  # what the numbers of each eval_mode mean (results JSON "eval_protocol")
    "letter": "our scorer (recipes/scoring.py): most likely letter ' A'..' D' after the standard MMLU prompt",
    "harness": "lm-evaluation-harness 0.4.13 MMLU definition, one task per subject; micro = acc, macro = acc_macro",
}
LETTERS = ("A", "B", "C", "D")
CHOICE_COLUMNS = ("choice0", "choice1", "choice2", "choice3")
HUB_SPLITS = {"dev": "dev", "val": "validation", "validation": "validation", "test": "test",
              "auxiliary_train": "auxiliary_train"}
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices / LETTERS


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------
def prompt_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(item: Question, with_answer: bool) -> str:
    text = item.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices))
    text += "\nAnswer:"
    return text + f" {LETTERS[item.answer]}\n\n" if with_answer else text


def build_prompt(item: Question, shots: list[Question] = ()) -> str:
    """The standard MMLU prompt for `item` after solved `shots` (same subject); ends in "Answer:"."""
    solved = "".join(format_question(shot, True) for shot in shots)
    return prompt_header(item.subject) + solved + format_question(item, False)


def fit_prompt(item: Question, shots: list[Question], tokenizer, max_length: Optional[int]) -> str:
    """`build_prompt` with shots dropped from the end until it fits in `max_length` tokens (Hendrycks' rule)."""
    shots = list(shots)
    while True:
        prompt = build_prompt(item, shots)
        if not shots or max_length is None or len(tokenizer(prompt)["input_ids"]) < max_length:
            return prompt
        shots.pop()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def _answer_index(value: Any, where: str) -> int:
    text = str(value).strip()
    if text.upper() in LETTERS:
        return LETTERS.index(text.upper())
    if text in {"0", "1", "2", "3"}:
        return int(text)
    raise ValueError(f"{where}: answer {value!r} is neither A-D nor 0-3.")


def read_mmlu_csv(path: Path) -> list[Question]:
    """Questions from one CSV in either layout:

    * with a header ``[subject,]question,choice0,choice1,choice2,choice3,answer`` (answer 0-3 or A-D; without a
      subject column the subject comes from the file name ``<subject>_<split>.csv``), as shipped in data/mmlu/;
    * Hendrycks' original headerless ``question,A,B,C,D,letter`` files named ``<subject>_<split>.csv``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMLU file {str(path)!r} does not exist.")
    file_subject = path.stem.rsplit("_", 1)[0]
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    has_header = "question" in header
    items = []
    for line, row in enumerate(rows[1:] if has_header else rows, start=2 if has_header else 1):
        where = f"{path}:{line}"
        if has_header:
            record = dict(zip(header, row))
            missing = [k for k in ("question", *CHOICE_COLUMNS, "answer") if k not in record]
            if missing:
                raise ValueError(f"{where}: missing columns {missing}; expected "
                                 "[subject,]question,choice0,choice1,choice2,choice3,answer.")
            subject = record.get("subject") or file_subject
            choices = tuple(record[c] for c in CHOICE_COLUMNS)
            question, answer = record["question"], record["answer"]
        else:
            if len(row) != 6:
                raise ValueError(f"{where}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}.")
            subject, question, choices, answer = file_subject, row[0], tuple(row[1:5]), row[5]
        items.append(Question(subject, question, choices, _answer_index(answer, where)))
    return items


def _from_hub(dataset_name: str, split: str) -> list[Question]:
    from datasets import load_dataset

    data = load_dataset(dataset_name, "all", split=HUB_SPLITS.get(split, split))
    return [Question(r["subject"], r["question"], tuple(r["choices"]), int(r["answer"])) for r in data]


def load_split(cfg: "MMLUConfig", split: str) -> list[Question]:
    """Questions of `split` from data_files, the Hub (dataset_name) or the shipped subsets, in that order."""
    if cfg.data_files and split in cfg.data_files:
        files = cfg.data_files[split]
        paths = []
        for entry in [files] if isinstance(files, str) else files:
            entry = Path(entry)
            paths += sorted(entry.glob("*.csv")) if entry.is_dir() else [entry]
        items = [q for p in paths for q in read_mmlu_csv(p)]
    elif cfg.dataset_name:
        items = _from_hub(cfg.dataset_name, split)
    else:
        path = SHIPPED_DATA / f"{split}.csv"
        if not path.is_file():
            shipped = sorted(p.stem for p in SHIPPED_DATA.glob("*.csv"))
            raise FileNotFoundError(f"No shipped MMLU split {split!r} (shipped: {', '.join(shipped)}); pass "
                                    f"data_files.{split}=<csv or folder> or dataset_name=cais/mmlu (online).")
        items = read_mmlu_csv(path)
    subjects = set(cfg.subject_list)
    return [q for q in items if q.subject in subjects]


def stratified_head(items: list[Question], limit: Optional[int]) -> list[Question]:
    """The first `limit` questions taken round-robin over subjects, so every subject stays represented."""
    if limit is None or limit >= len(items):
        return items
    seen: dict[str, int] = defaultdict(int)
    keys = []
    for index, item in enumerate(items):
        keys.append((seen[item.subject], index))
        seen[item.subject] += 1
    ordered = [items[index] for _, index in sorted(keys)]
    return ordered[:limit]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, questions: list[Question], shots_by_subject: dict[str, list[Question]],
             num_fewshot: int, batch_size: int = 8, max_length: Optional[int] = None, progress: bool = False,
             eval_mode: str = "letter") -> dict:
    """Macro/micro accuracy and per-subject accuracy of next-token letter scoring, by our scorer (``letter``) or by
    lm-evaluation-harness's MMLU definition (``harness``; also its acc / acc_norm / n as ``harness_metrics``)."""
    if not questions:
        raise ValueError("No MMLU questions to evaluate (check `subjects` and the eval split).")
    if eval_mode == "harness":
        import harness

        shots = [q for subject_shots in shots_by_subject.values() for q in subject_shots]
        details = harness.run_configs(model, tokenizer, {"mmlu": harness.mmlu_configs(questions, shots)},
                                      num_fewshot=num_fewshot, batch_size=batch_size, max_length=max_length,
                                      progress=progress)
        per_subject = {s: details[f"mmlu_{s}"]["acc"] for s in sorted({q.subject for q in questions})}
        return {"accuracy_macro": details["mmlu"]["acc_macro"], "accuracy_micro": details["mmlu"]["acc"],
                "per_subject": per_subject, "num_questions": len(questions), "harness_metrics": details["mmlu"]}
    if eval_mode != "letter":
        raise ValueError(f"`eval_mode` must be one of {', '.join(EVAL_MODES)}, got {eval_mode!r}.")
    max_length = max_length or scoring.model_max_length(model)
    prompts = [fit_prompt(q, shots_by_subject.get(q.subject, [])[:num_fewshot], tokenizer, max_length)
               for q in questions]
    scores = scoring.score_continuations(
        model, tokenizer, prompts, [[f" {letter}" for letter in LETTERS]] * len(questions),
        batch_size=batch_size, max_length=max_length, progress=progress,
    )
    correct: dict[str, list[bool]] = defaultdict(list)
    for item, item_scores in zip(questions, scores):
        correct[item.subject].append(scoring.pick(item_scores) == item.answer)
    per_subject = {s: sum(v) / len(v) for s, v in sorted(correct.items())}
    return {
        "accuracy_macro": sum(per_subject.values()) / len(per_subject),
        "accuracy_micro": sum(sum(v) for v in correct.values()) / len(questions),
        "per_subject": per_subject,
        "num_questions": len(questions),
    }


# ---------------------------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class MMLUConfig(common.RecipeConfig):
    recipe: str = field(default="mmlu", metadata={"help": "Recipe script this config is for."})
    task: str = field(default="mmlu", metadata={"help": "Results name of the task."})
    model_name_or_path: str = field(
        default=models.SMOLLM2_ALIAS,
        metadata={"help": f"Causal LM: '{models.SMOLLM2_ALIAS}' (offline GGUF), a local folder or a Hub id."},
    )
    subjects: Any = field(default="all", metadata={"help": "'all' or a list of the 57 MMLU subject names."})
    num_fewshot: int = field(default=5, metadata={"help": "Solved dev questions in each prompt (0 = zero-shot)."})
    fewshot_split: str = field(default="dev", metadata={"help": "Split the shots come from (first k per subject)."})
    train_split: str = field(
        default="val", metadata={"help": "Fine-tuning split: 'val' (shipped pre-release pool) or auxiliary_train."}
    )
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate."})
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Also train on prompt tokens (not only the answer)."}
    )
    eval_mode: str = field(default=DEFAULT_EVAL_MODE, metadata={"help": f"Scoring: {', '.join(EVAL_MODES)}."})
    max_eval_length: Optional[int] = field(
        default=None, metadata={"help": "Token budget of a k-shot prompt (default: the model's context length)."}
    )
    target_modules: Any = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers to project / adapt (attention + MLP, as GaLore/OwLore do)."},
    )

    def __post_init__(self):
        unknown = [s for s in self.subject_list if s not in SUBJECTS]
        if unknown:
            raise ValueError(f"Unknown MMLU subjects {unknown}. Valid subjects: {', '.join(SUBJECTS)} (or 'all').")
        if self.num_fewshot < 0:
            raise ValueError(f"`num_fewshot` must be >= 0, got {self.num_fewshot}.")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"`eval_mode` must be one of {', '.join(EVAL_MODES)}, got {self.eval_mode!r}.")
        if self.train_split == self.eval_split and self.do_train:
            raise ValueError(
                f"`train_split` and `eval_split` are both {self.eval_split!r}: fine-tune on another split."
            )
        super().__post_init__()

    def run_name_parts(self) -> list[str]:
        """The common parts with ``zeroshot`` / ``fewshot<k>`` for evaluation-only runs (``<k>shot`` after the step
        budget of trained runs), the subject set unless it is all 57, and the protocol unless it is the default."""
        parts = super().run_name_parts()
        if not self.do_train:
            parts[1] = scoring.shots_label(self.num_fewshot)
        else:
            parts.insert(-1, f"{self.num_fewshot}shot")
        subjects = [] if set(self.subject_list) == set(SUBJECTS) else [scoring.set_tag(self.subject_list)]
        protocol = [] if self.eval_mode == DEFAULT_EVAL_MODE else [self.eval_mode]
        return [*parts[:-1], *subjects, *protocol, parts[-1]]

    @property
    def subject_list(self) -> list[str]:
        if self.subjects in ("all", None, []):
            return list(SUBJECTS)
        return [self.subjects] if isinstance(self.subjects, str) else list(self.subjects)


def training_dataset(questions: list[Question], tokenizer, cfg: MMLUConfig):
    """Zero-shot prompts with their answer letter, answer-only loss unless `train_on_inputs`."""
    from datasets import Dataset

    features = [
        models.supervised_features(tokenizer, build_prompt(q), f" {LETTERS[q.answer]}", cfg.max_seq_length,
                                   cfg.train_on_inputs)
        for q in questions
    ]
    return Dataset.from_list(features)


def main(argv=None) -> dict:
    from transformers import DataCollatorForSeq2Seq, set_seed

    cfg = common.parse_args(MMLUConfig, argv, recipe="mmlu")
    with common.recording_errors(cfg):
        common.check_mode(cfg.mode)
        set_seed(cfg.seed)
        eval_questions = stratified_head(load_split(cfg, cfg.eval_split), cfg.max_eval_samples)
        shots: dict[str, list[Question]] = defaultdict(list)
        if cfg.num_fewshot:
            for q in load_split(cfg, cfg.fewshot_split):
                shots[q.subject].append(q)
        train_questions = load_split(cfg, cfg.train_split) if cfg.do_train else []
        if cfg.do_train and not train_questions:
            raise ValueError(f"Split {cfg.train_split!r} has no questions for the chosen subjects.")
        if cfg.max_train_samples is not None:
            train_questions = train_questions[: cfg.max_train_samples]
        model, tokenizer = models.load_causal_lm(cfg.model_name_or_path)
        train_dataset = training_dataset(train_questions, tokenizer, cfg) if cfg.do_train else None
        model, optimizer_spec = common.build_optimizer(model, cfg, task_type="CAUSAL_LM")
        trainer, meter = common.fit(
            cfg, model, optimizer_spec, train_dataset, DataCollatorForSeq2Seq(tokenizer, padding=True),
            processing_class=tokenizer,
        )
        result = evaluate(trainer.model, tokenizer, eval_questions, shots, cfg.num_fewshot, cfg.eval_batch_size,
                          cfg.max_eval_length, progress=cfg.progress, eval_mode=cfg.eval_mode)
        metrics = {"accuracy_macro": result["accuracy_macro"], "accuracy_micro": result["accuracy_micro"]}
    common.logger.warning(f"{cfg.run_name}: {metrics} on {result['num_questions']} questions, "
                          f"{cfg.num_fewshot}-shot")
    if trainer.is_world_process_zero():
        common.write_results(
            cfg, metrics, meter=meter, model=model, optimizer=trainer.optimizer, main_metric="accuracy_macro",
            examples_per_step=common.examples_per_step(cfg, trainer),
            extra={"per_subject_accuracy": result["per_subject"], "num_eval_questions": result["num_questions"],
                   "num_fewshot": cfg.num_fewshot, "limit": cfg.max_eval_samples, "eval_mode": cfg.eval_mode,
                   "eval_protocol": EVAL_PROTOCOLS[cfg.eval_mode],
                   **({"harness_metrics": result["harness_metrics"]} if "harness_metrics" in result else {})},
        )
        if cfg.do_train and (cfg.save_model or cfg.push_to_hub):
            from hf_lowrank import hub

            hub.save_pretrained(trainer.model, cfg.output_dir, tokenizer=tokenizer, results=common.results_path(cfg))
            if cfg.push_to_hub:
                hub.push_to_hub(cfg.output_dir, cfg.hub_model_id)
    return {**metrics, "per_subject": result["per_subject"]}


if __name__ == "__main__":
    common.run_script(main)
