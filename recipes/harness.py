"""lm-evaluation-harness as the evaluator of the MMLU and commonsense recipes (the ``[eval]`` extra, ``lm-eval``).

The model in memory is wrapped with the harness's ``HFLM(pretrained=model, tokenizer=tokenizer)`` and scored on the
harness's own task definitions (the YAMLs shipped inside ``lm_eval/tasks``: prompt, choices, target, metrics),
with only the data source replaced: the documents come from local files, converted to the schema each definition
reads, and reach the harness as an in-memory ``datasets.Dataset`` (``custom_dataset``), so nothing is downloaded.

* Commonsense tasks read LLM-Adapters records (the recipe's format): the instruction's question and option texts
  become e.g. ARC's ``question``/``choices``/``answerKey``, WinoGrande's ``sentence``/``option1``/``option2``,
  HellaSwag's ``activity_label``/``ctx_a``/``endings`` (the harness's own ``process_docs`` then runs). LLM-Adapters'
  BoolQ records carry no passage, so the harness's BoolQ prompt has an empty passage line. Few-shot examples are
  drawn (seeded) from the same file with the scored item left out, as the harness does when the shot split is the
  test split.
* MMLU runs one harness task per subject (``mmlu_<subject>``: its description and the ``first_n`` shots from the
  dev split); ``mmlu`` aggregates them as the harness's group does (accuracy over all questions, weighted by
  size) and also reports the mean over subjects (``acc_macro``).

Every task reports ``acc`` and ``acc_norm`` (``acc_norm`` is added to the definitions that list only ``acc``: it is
computed from the same log-likelihoods divided by the choice's length in characters; for MMLU's one-letter
choices it equals ``acc``).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional
from unittest import mock


sys.path.insert(0, str(Path(__file__).resolve().parent))
import commonsense  # noqa: E402
import mmlu  # noqa: E402


# Harness task name -> its definition under lm_eval/tasks/.
TASK_FILES = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
# LLM-Adapters dataset folder (the commonsense recipe's task names) -> harness task name.
COMMONSENSE_TASKS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "social_iqa",
    "ARC-Easy": "arc_easy",
    "ARC-Challenge": "arc_challenge",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "openbookqa": "openbookqa",
}
MMLU = "mmlu"
MMLU_FEWSHOT = "mmlu_fewshot"  # data_files key of the MMLU shot pool (default: the shipped dev split)
METRICS = ("acc", "acc_norm")
_FEWSHOT_SPLIT = "fewshot"


def _require_lm_eval():
    from hf_lowrank.utils import require

    require("lm_eval", "eval", "Evaluation with lm-evaluation-harness")


def tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def canonical_task(name: str) -> str:
    """Harness task name of `name` (a harness name, an LLM-Adapters folder name, ``mmlu`` or ``mmlu_<subject>``)."""
    if name in TASK_FILES or name == MMLU:
        return name
    if name in COMMONSENSE_TASKS:
        return COMMONSENSE_TASKS[name]
    if name.startswith("mmlu_") and name[5:] in mmlu.SUBJECTS:
        return name
    valid = sorted({*TASK_FILES, *COMMONSENSE_TASKS, MMLU}) + ["mmlu_<subject>"]
    raise ValueError(f"Unknown harness task {name!r}. Valid tasks: {', '.join(valid)}.")


# ---------------------------------------------------------------------------------------------------------------
# Documents in the schema of each harness definition
# ---------------------------------------------------------------------------------------------------------------
def _split_siqa(text: str) -> tuple[str, str]:
    """(context, question) of Social IQa's joined "context question?" text, split before the last sentence. The
    harness renders "Q: {context} {question}", which gives back the joined text exactly."""
    context, sep, question = text.rpartition(". ")
    if sep:
        return context + ".", question
    context, _, question = text.rpartition(" ")
    return context, question


def commonsense_doc(task: str, record: dict, where: str) -> dict:
    """The harness document of harness task `task` for one LLM-Adapters record."""
    labels = commonsense.answer_labels(record["instruction"])
    question, options = commonsense.split_options(record["instruction"])
    if record["answer"] not in labels:
        raise ValueError(f"{where}: answer {record['answer']!r} is not one of the answer format's labels {labels}.")
    gold = labels.index(record["answer"])
    expected = {"boolq": 0, "piqa": 2, "social_iqa": 3, "winogrande": 2}.get(task)
    if expected is not None and len(options) != expected:
        raise ValueError(f"{where}: {task} records list {expected} options, this one lists {len(options)} "
                         f"({labels}); is the file for another task?")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if task == "boolq":
        return {"passage": record.get("input", ""), "question": question.rstrip("?"), "label": int(gold == 0)}
    if task == "piqa":
        return {"goal": question, "sol1": options[0], "sol2": options[1], "label": gold}
    if task == "social_iqa":
        context, query = _split_siqa(question)
        return {"context": context, "question": query, "answerA": options[0], "answerB": options[1],
                "answerC": options[2], "label": str(gold + 1)}
    if task in ("arc_easy", "arc_challenge"):
        return {"question": question, "choices": {"text": options, "label": letters}, "answerKey": letters[gold]}
    if task == "openbookqa":
        return {"question_stem": question, "choices": {"text": options, "label": letters}, "answerKey": letters[gold]}
    if task == "hellaswag":
        activity, sep, context = question.partition(": ")  # LLM-Adapters writes "<activity label>: <context>"
        if not sep:
            activity, context = "", question
        return {"activity_label": activity, "ctx_a": context, "ctx_b": "", "endings": options, "label": str(gold)}
    if task == "winogrande":
        if "_" not in question:
            raise ValueError(f"{where}: a WinoGrande sentence needs the '_' blank the options fill: {question!r}.")
        return {"sentence": question, "option1": options[0], "option2": options[1], "answer": str(gold + 1)}
    raise ValueError(f"{task!r} is not a commonsense harness task ({', '.join(COMMONSENSE_TASKS.values())}).")


def mmlu_doc(question: "mmlu.Question") -> dict:
    return {"question": question.question, "choices": list(question.choices), "answer": question.answer,
            "subject": question.subject}


# ---------------------------------------------------------------------------------------------------------------
# Task configs: the harness's definition with its data replaced
# ---------------------------------------------------------------------------------------------------------------
def task_config(task: str, yaml_file: str, docs: list[dict], fewshot_docs: Optional[list[dict]] = None) -> dict:
    """The harness definition `yaml_file` (under lm_eval/tasks) evaluating `docs`, shots from `fewshot_docs` (default:
    the other test docs)."""
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    if not docs:
        raise ValueError(f"harness task {task!r} has no documents to evaluate.")
    cfg = load_yaml(tasks_dir() / yaml_file, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    splits = {"test": datasets.Dataset.from_list(docs)}
    if fewshot_docs:
        splits[_FEWSHOT_SPLIT] = datasets.Dataset.from_list(fewshot_docs)
    listed = {m["metric"] for m in cfg.get("metric_list", [])}
    cfg.update(
        task=task, dataset_path=None, dataset_name=None, dataset_kwargs=None,
        custom_dataset=lambda **_: datasets.DatasetDict(splits),
        training_split=None, validation_split=None, test_split="test",
        fewshot_split=_FEWSHOT_SPLIT if fewshot_docs else "test",
        metric_list=cfg.get("metric_list", []) + [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS if m not in listed],
    )
    return cfg


def commonsense_config(task: str, records: list[dict], source: str = "records") -> dict:
    """Harness config of commonsense task `task` (harness or LLM-Adapters name) on LLM-Adapters `records`."""
    harness_task = canonical_task(task)
    if harness_task not in TASK_FILES:
        raise ValueError(f"{task!r} is not a commonsense task ({', '.join(COMMONSENSE_TASKS)}).")
    docs = [commonsense_doc(harness_task, r, f"{source} record {i}") for i, r in enumerate(records)]
    return task_config(harness_task, TASK_FILES[harness_task], docs)


def mmlu_configs(questions: list["mmlu.Question"], shots: list["mmlu.Question"] = ()) -> list[dict]:
    """One harness config per subject of `questions` (``mmlu_<subject>``), shots from that subject's `shots`."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    shots_by_subject: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        by_subject[q.subject].append(mmlu_doc(q))
    for q in shots:
        shots_by_subject[q.subject].append(mmlu_doc(q))
    return [task_config(f"mmlu_{s}", f"mmlu/default/mmlu_{s}.yaml", docs, shots_by_subject.get(s) or None)
            for s, docs in sorted(by_subject.items())]


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
def harness_lm(model, tokenizer, batch_size: int, max_length: Optional[int] = None, progress: bool = True):
    """The harness's ``HFLM`` around an in-memory model; its request progress bar only when `progress`."""
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _check_configs(configs: dict[str, list[dict]], limit, num_fewshot: int, batch_size: int) -> None:
    if num_fewshot < 0:
        raise ValueError(f"`num_fewshot` must be >= 0, got {num_fewshot}.")
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be a positive number of documents per task or None, got {limit}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    seen: dict[str, str] = {}
    for name, task_configs in configs.items():
        for cfg in task_configs:
            if cfg["task"] in seen:
                raise ValueError(f"tasks {seen[cfg['task']]!r} and {name!r} are the same harness task "
                                 f"{cfg['task']!r}; list it once.")
            seen[cfg["task"]] = name
            pool = cfg["custom_dataset"]()[cfg["fewshot_split"]].num_rows - (cfg["fewshot_split"] == "test")
            if num_fewshot > pool:
                raise ValueError(f"task {name!r}: num_fewshot={num_fewshot} needs at least that many other "
                                 f"documents to draw shots from, {cfg['task']} has {pool}.")


def simple_evaluate(model, tokenizer, configs: dict[str, list[dict]], *, limit: Optional[int] = None,
                    num_fewshot: int = 0, batch_size: int = 8, max_length: Optional[int] = None,
                    progress: bool = True, log_samples: bool = False) -> dict:
    """The harness's ``simple_evaluate`` output for task configs (``configs[name]``: the configs of one task)."""
    _require_lm_eval()
    import lm_eval
    import lm_eval.api.task
    from lm_eval.tasks import TaskManager

    _check_configs(configs, limit, num_fewshot, batch_size)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    was_training = model.training
    model.eval()
    # the harness builds each task's requests under a tqdm bar it offers no switch for
    quiet = contextlib.nullcontext() if progress else mock.patch.object(
        lm_eval.api.task, "tqdm", functools.partial(lm_eval.api.task.tqdm, disable=True))
    try:
        with quiet:
            return lm_eval.simple_evaluate(
                model=harness_lm(model, tokenizer, batch_size, max_length, progress),
                tasks=[cfg for task_configs in configs.values() for cfg in task_configs],
                num_fewshot=num_fewshot, limit=limit, task_manager=TaskManager(include_defaults=False),
                bootstrap_iters=0, log_samples=log_samples,
                # leave the caller's generators alone
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            )
    finally:
        model.train(was_training)


def run_configs(model, tokenizer, configs: dict[str, list[dict]], **kwargs) -> dict[str, dict[str, float]]:
    """Metrics of harness task configs (keywords of :func:`simple_evaluate`); ``configs[name]`` is one config, or
    several (MMLU's subjects) reported both one by one and aggregated under `name`."""
    output = simple_evaluate(model, tokenizer, configs, **kwargs)
    results, counts = output["results"], output["n-samples"]
    metrics: dict[str, dict[str, float]] = {}
    for name, task_configs in configs.items():
        parts = {}
        for cfg in task_configs:
            task = cfg["task"]
            parts[task] = {m: float(results[task][f"{m},none"]) for m in METRICS}
            parts[task]["n"] = int(counts[task]["effective"])
        if len(task_configs) == 1 and task_configs[0]["task"] == canonical_task(name):
            metrics[name] = parts[task_configs[0]["task"]]
            continue
        total = sum(p["n"] for p in parts.values())
        metrics[name] = {m: sum(p[m] * p["n"] for p in parts.values()) / total for m in METRICS}
        metrics[name]["acc_macro"] = sum(p["acc"] for p in parts.values()) / len(parts)
        metrics[name]["n"] = total
        metrics.update(parts)
    return metrics


def _load_configs(task: str, data_files: dict[str, str]) -> list[dict]:
    canonical = canonical_task(task)
    if canonical == MMLU or canonical.startswith("mmlu_"):
        subjects = "all" if canonical == MMLU else [canonical[5:]]
        files = {split: data_files[key] for split, key in (("test", task), ("dev", MMLU_FEWSHOT)) if key in data_files}
        cfg = mmlu.MMLUConfig(do_train=False, subjects=subjects, data_files=files or None)
        questions = mmlu.load_split(cfg, "test")
        if not questions:
            raise ValueError(f"task {task!r}: no MMLU test questions for subjects {cfg.subject_list[:3]}...")
        return mmlu_configs(questions, mmlu.load_split(cfg, "dev"))
    folder = next(f for f, t in COMMONSENSE_TASKS.items() if t == canonical)
    path = data_files.get(task) or data_files.get(folder) or data_files.get(canonical)
    if path is None:
        shipped = commonsense.SHIPPED_DATA / folder / "test.json"
        if not shipped.is_file():
            raise ValueError(f"task {task!r} has no shipped test set: pass data_files={{{task!r}: <LLM-Adapters "
                             "test.json>}}.")
        path = shipped
    return [commonsense_config(canonical, commonsense.read_records(path), source=str(path))]


def evaluate_with_harness(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    data_files: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Score an in-memory causal LM with lm-evaluation-harness on local data; returns task -> {"acc", "acc_norm", "n"}.

    `tasks`: harness names (boolq, piqa, social_iqa, arc_easy, arc_challenge, hellaswag, winogrande, openbookqa,
    mmlu, mmlu_<subject>) or the commonsense recipe's LLM-Adapters names (social_i_qa, ARC-Easy, ...); results are
    keyed by the names given. Data: ``data_files[task]`` (LLM-Adapters .json/.jsonl for commonsense tasks, an MMLU
    CSV or folder for mmlu, ``data_files["mmlu_fewshot"]`` for MMLU's shot pool), else the shipped subsets (MMLU,
    BoolQ, PIQA, SIQA, ARC-e/c; HellaSwag, WinoGrande and OBQA need a file). `limit`: first documents per harness
    task (per subject for mmlu). ``mmlu`` also returns ``acc_macro`` (mean over subjects) and one entry per subject.
    "n" is the number of documents scored. The model's train/eval mode and the global random generators are left
    as they were.
    """
    _require_lm_eval()
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"`tasks` must be a non-empty list of task names, got {tasks!r}.")
    data_files = dict(data_files or {})
    configs = {task: _load_configs(task, data_files) for task in tasks}
    return run_configs(model, tokenizer, configs, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                       progress=progress)
