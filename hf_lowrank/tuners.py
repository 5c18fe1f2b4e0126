"""Our own small registry of PEFT-shaped tuners (model surgery methods) and their shared save/load/Hub code.

A tuner is a ``(config_cls, model_cls)`` pair registered under a lower-case name. The model class wraps a
transformers model whose targeted layers were replaced *in place* (so the wrapped model can be handed to
``Trainer`` unchanged) and adds ``save_pretrained`` / ``from_pretrained`` / ``merge_and_unload`` /
``push_to_hub``. On disk a tuner is ``hf_lowrank_config.json`` (method, config, per-module layout, version)
plus ``model.safetensors`` holding only the tensors the tuner created or trains, keyed by their names in the
wrapped model, and a generated ``README.md`` model card.
"""
import dataclasses
import importlib
import json
import os
import re
import tempfile
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers.utils import logging


logger = logging.get_logger(__name__)

CONFIG_NAME = "hf_lowrank_config.json"
WEIGHTS_NAME = "model.safetensors"

TUNERS: dict[str, tuple[type, type]] = {}
# Built-in tuners register themselves when their package is imported; `get_tuner` imports them on demand.
_BUILTIN = {"welore": "hf_lowrank.welore", "gradnormlorp": "hf_lowrank.gradnormlorp"}


def register_tuner(name: str, config_cls: type, model_cls: type) -> None:
    """Register a tuner under a lower-case name (the ``method`` field written to ``hf_lowrank_config.json``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*[a-z0-9]", name):
        raise ValueError(f"Tuner name {name!r} must be lower case letters/digits/underscores, e.g. 'welore'.")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"`config_cls` for tuner {name!r} must be a dataclass, got {config_cls!r}.")
    if name in TUNERS and TUNERS[name] != (config_cls, model_cls):
        raise ValueError(f"A different tuner is already registered as {name!r}.")
    TUNERS[name] = (config_cls, model_cls)


def get_tuner(name: str) -> tuple[type, type]:
    """``(config_cls, model_cls)`` of a registered tuner."""
    if name not in TUNERS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in TUNERS:
        raise ValueError(f"Unknown tuner {name!r}; available: {sorted(set(TUNERS) | set(_BUILTIN))}.")
    return TUNERS[name]


def load_tuner(base_model: nn.Module, path: str):
    """Rebuild whichever tuner was saved in `path` on top of `base_model` (dispatches on its ``method``)."""
    method = read_tuner_json(path)["method"]
    return get_tuner(method)[1].from_pretrained(base_model, path)


def read_tuner_json(path: str) -> dict:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"No {CONFIG_NAME} in {path!r}: is this a directory written by save_pretrained?")
    with open(file) as f:
        return json.load(f)


def config_to_dict(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_from_dict(config_cls: type, values: dict):
    """Build a config from saved values; keys this version does not know are dropped with a warning."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        logger.warning(f"Ignoring unknown {config_cls.__name__} keys (saved by another version?): {unknown}")
    return config_cls(**{k: v for k, v in values.items() if k in known})


def set_trainable(model: nn.Module, trainable_names: set[str]) -> None:
    """Freeze every parameter of `model` except those named in `trainable_names`."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable_names)


def modules_to_save_names(model: nn.Module, modules_to_save) -> set[str]:
    """Parameter names of the modules matched (as a name or a name suffix) by `modules_to_save`."""
    names = set()
    for pattern in modules_to_save or ():
        matched = [n for n, _ in model.named_modules() if n == pattern or n.endswith("." + pattern)]
        if not matched:
            raise ValueError(f"`modules_to_save` entry {pattern!r} matches no module of the model.")
        for module_name in matched:
            names.update(f"{module_name}.{p}" for p, _ in model.get_submodule(module_name).named_parameters())
    return names


class TunerModel(nn.Module):
    """Base of a tuner wrapper: holds the surgically changed transformers ``model`` and its ``tuner_config``.

    Other attributes (``config``, ``generate``, ...) are looked up on the wrapped model, as in peft.

    Subclasses set ``method`` and implement :meth:`_apply_layout` (surgery from a saved layout, no
    data-dependent computation), :meth:`layout` (what that surgery needs, JSON-serialisable),
    :meth:`tuner_state_dict` and :meth:`merge_and_unload`.
    """

    method: str = ""

    def __init__(self, model: nn.Module, config):
        super().__init__()
        self.model = model
        self.tuner_config = config
        # what merge_and_unload restores: the base model's own trainable / frozen choice per parameter
        self.original_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # --- subclass hooks ---------------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        raise NotImplementedError

    def _apply_layout(self, layout: dict[str, Any]) -> None:
        raise NotImplementedError

    def tuner_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def merge_and_unload(self) -> nn.Module:
        raise NotImplementedError

    def card_details(self) -> list[str]:
        """Markdown lines describing this tuner's result, added to the model card."""
        return []

    def restore_requires_grad(self) -> None:
        """After a merge: every parameter trainable or frozen as it was before the tuner was applied (a merged
        layer's weight as the weight it replaced)."""
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.original_requires_grad.get(name, True))

    def projected_parameter_names(self) -> list[str]:
        """Trainable 2-D parameters whose gradients may be projected to low rank (GaLore-style)."""
        return []

    # --- optimizer ----------------------------------------------------------------------------------
    def optimizer_cls_and_kwargs(self, lr: float = 1e-3, *, rank: int | None = None, **options) -> tuple[type, dict]:
        """``(ProjectedOptimizer, kwargs)`` over the trainable parameters, built by the library's one group builder
        (:func:`hf_lowrank.optim.optimizer_cls_and_kwargs`). Pass it as ``Trainer(optimizer_cls_and_kwargs=...)``.

        With `rank`, :meth:`projected_parameter_names` are projected (mode ``galore``; ``update_proj_gap``,
        ``scale``, ``proj_type``, ``projector`` and every other option of that function apply, with the mode's
        defaults); every other trainable parameter gets plain AdamW in the same optimizer. Without `rank`: AdamW.
        """
        from .optim import optimizer_cls_and_kwargs

        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("The model has no trainable parameter: nothing for an optimizer to update.")
        if rank is None:
            return optimizer_cls_and_kwargs(self.model, "adamw", lr=lr, **options)
        return optimizer_cls_and_kwargs(self.model, "galore", projected_parameters=self.projected_parameter_names(),
                                        rank=rank, lr=lr, **options)

    def create_optimizer(self, lr: float = 1e-3, **kwargs):
        """The optimizer of :meth:`optimizer_cls_and_kwargs`, built: ``Trainer(optimizers=(opt, None))``."""
        cls, cls_kwargs = self.optimizer_cls_and_kwargs(lr, **kwargs)
        return cls(**cls_kwargs)

    # --- shared behaviour ---------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }

    def save_pretrained(self, save_directory: str, repo_id: str | None = None, *, state_dict: dict | None = None,
                        is_main_process: bool = True, safe_serialization: bool = True) -> None:
        """Write ``hf_lowrank_config.json``, ``model.safetensors`` (tuner tensors only) and ``README.md`` (its card
        names `repo_id` when given). ``state_dict`` / ``is_main_process`` are what ``Trainer`` passes (a state dict
        gathered under FSDP / DeepSpeed, and whether this rank writes): the tuner tensors are taken from it."""
        from hf_lowrank import __version__

        if not safe_serialization:
            raise ValueError("Tuners save safetensors only; drop `safe_serialization=False`.")
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        payload = {
            "method": self.method,
            "hf_lowrank_version": __version__,
            "base_model": self._base_model_name(),
            "config": config_to_dict(self.tuner_config),
            "layout": self.layout(),
        }
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
        own = self.tuner_state_dict()
        if state_dict is not None:  # keyed by this wrapper's names ("model." + the wrapped model's names)
            own = {k: state_dict.get(f"model.{k}", state_dict.get(k, v)) for k, v in own.items()}
        tensors = {k: v.detach().contiguous().cpu() for k, v in own.items()}
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        self.model_card(repo_id).save(os.path.join(save_directory, "README.md"))

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str):
        """Rebuild on the *original* base model from a saved directory; no data-dependent recomputation."""
        payload = read_tuner_json(path)
        if payload["method"] != cls.method:
            raise ValueError(f"{path!r} holds a {payload['method']!r} tuner, not {cls.method!r}.")
        config_cls = get_tuner(cls.method)[0]
        tuner = cls(base_model, config_from_dict(config_cls, payload["config"]))
        tuner._apply_layout(payload["layout"])
        state = load_file(os.path.join(path, WEIGHTS_NAME))
        own = dict(tuner.model.named_parameters()) | dict(tuner.model.named_buffers())
        missing = sorted(set(state) - set(own))
        if missing:
            raise ValueError(f"Saved tensors {missing[:5]} do not exist in the rebuilt model: wrong base model?")
        not_saved = sorted(set(tuner.tuner_state_dict()) - set(state))
        if not_saved:
            raise ValueError(f"{path!r} lacks tensors {not_saved[:5]} that the {cls.method} layout needs.")
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise ValueError(f"Saved {name} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(own[name].shape)}.")
                own[name].copy_(tensor)
        return tuner

    def _base_model_name(self) -> str | None:
        config = getattr(self.model, "config", None)
        return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None

    def model_card(self, repo_id: str | None = None):
        """A Hub model card (metadata, method, parameter counts, :meth:`card_details`, how to load), rendered by
        :func:`hf_lowrank.hub.render_card` like every other card of the library."""
        from huggingface_hub import ModelCardData

        from . import hub

        base = self._base_model_name()
        method = hub.method_for(self.method)
        counts = self.parameter_counts()
        saved_bytes = sum(t.numel() * t.element_size() for t in self.tuner_state_dict().values())
        data = ModelCardData(
            model_name=repo_id,
            library_name="hf_lowrank",
            tags=sorted({"hf_lowrank", self.method}),
            base_model=hub.hub_base_model(base),
        )
        return hub.render_card(
            data,
            title=repo_id or f"{method.name} model (hf_lowrank)",
            summary=f"{f'`{base}`' if base else 'A transformers model'} rebuilt with the **{method.name}** tuner of "
                    f"`hf_lowrank` (`{self.method}`).",
            method=method,
            details=self.card_details(),
            resources=[
                ("total parameters", f"{counts['total']:,}"),
                ("trainable parameters", f"{counts['trainable']:,}"),
                ("saved tuner tensors", f"{saved_bytes / 2**20:,.1f} MB"),
            ],
            usage="\n".join([
                "from huggingface_hub import snapshot_download",
                "from transformers import AutoModelForCausalLM  # or the base model's own Auto class",
                "from hf_lowrank.tuners import load_tuner",
                "",
                f"base_model = AutoModelForCausalLM.from_pretrained({data.base_model or '<base model>'!r})",
                f"model = load_tuner(base_model, snapshot_download({repo_id or '<this repo>'!r}))",
                "dense = model.merge_and_unload()  # a plain transformers model",
            ]),
        )

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, revision: str | None = None) -> Any:
        """Create `repo_id` if needed and upload what :meth:`save_pretrained` writes (config, tensors, card)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, repo_id=repo_id)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp_dir, revision=revision,
                commit_message=commit_message or f"Upload {self.method} tuner",
            )
