"""Preparing, saving, reloading and exporting Q-GaLore models."""
import json
import os

import torch
import torch.nn as nn

from ..optim.sinks import attach_update_sink, update_sink_of
from ..utils.targets import find_target_linears
from .config import QGaLoreConfig
from .layer import CarrierPool, FakeQuantSink, QuantLinear, WeightQuantizer, layer_seed


CONFIG_NAME = "qgalore_config.json"


def prepare_model_for_qgalore(model: nn.Module, config: QGaLoreConfig | None = None, **options) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` (in place) by :class:`QuantLinear` (or, with
    ``simulate=True``, attach the fake-quant reference to them). Options are :class:`QGaLoreConfig`'s
    (``target_modules``, ``weight_bits``, ``group_size``, ``stochastic_rounding``, ``seed``, ``simulate``).
    Other parameters are untouched. Returns ``model``; its config is kept as ``model.qgalore_config``."""
    if config is not None and options:
        raise ValueError(f"Pass either `config` or options {sorted(options)}, not both.")
    config = config or QGaLoreConfig(**options)
    if getattr(model, "qgalore_config", None) is not None:
        raise ValueError("This model is already prepared for Q-GaLore (it has `qgalore_config`).")
    targets = _targets(model, config)
    pool = CarrierPool(max(m.weight.numel() for _, m in targets))
    for name, linear in targets:
        quantizer = WeightQuantizer(config.weight_bits, config.group_size, config.stochastic_rounding,
                                    layer_seed(config.seed, name))
        if config.simulate:
            attach_update_sink(linear.weight, FakeQuantSink(linear, quantizer))
        else:
            model.set_submodule(name, QuantLinear.from_linear(linear, quantizer, pool))
    model.qgalore_config = config
    return model


def _targets(model: nn.Module, config: QGaLoreConfig) -> list[tuple[str, nn.Linear]]:
    # Q-GaLore quantizes nn.Linear only (GPT-2's Conv1D is not supported yet): anything else is an error
    targets = find_target_linears(model, config.target_modules, module_types=(nn.Linear,), unsupported="raise")
    for name, linear in targets:
        if linear.in_features % config.group_size:
            divisors = [d for d in (32, 64, 128, 256, 512) if linear.in_features % d == 0]
            raise ValueError(
                f"`group_size`={config.group_size} does not divide the input dimension {linear.in_features} of "
                f"{name!r}; groups lie within rows. Use a divisor of every targeted in_features, e.g. {divisors}.")
        if update_sink_of(linear.weight) is not None:
            raise ValueError(f"{name!r} already has an update sink (quantized twice?).")
    return targets


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def save_qgalore(model, directory: str) -> None:
    """``model.save_pretrained(directory)`` (safetensors: INT8 codes, fp32 scales and zero points, every other
    weight as it is) plus ``qgalore_config.json``; :func:`load_qgalore` reloads it."""
    config = _config_of(model)
    model.save_pretrained(directory)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config.to_dict(), f, indent=2)


def load_qgalore(directory: str, model_class=None, **from_config_kwargs):
    """Rebuild a model saved by :func:`save_qgalore`: the architecture from ``config.json``, the same Q-GaLore
    preparation, then every saved tensor loaded strictly (identical logits)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} has no {CONFIG_NAME}: it was not saved with save_qgalore (a dense "
                                "checkpoint loads with from_pretrained).")
    with open(path) as f:
        config = QGaLoreConfig(**json.load(f))
    model_class = model_class or AutoModelForCausalLM
    model = model_class.from_config(AutoConfig.from_pretrained(directory), **from_config_kwargs)
    prepare_model_for_qgalore(model, config)
    state = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith(".safetensors"):
            state.update(load_file(os.path.join(directory, file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"Checkpoint {directory!r} does not match the model: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    return model


def dense_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every quantized layer's codes / scale / minimum replaced by its dequantized
    ``weight`` (in ``dtype``, default the carrier's): the state dict of the same model with ``nn.Linear`` layers."""
    state = model.state_dict()
    for name, layer in quantized_layers(model).items():
        prefix = f"{name}." if name else ""
        for key in ("codes", "scale", "minimum"):
            del state[prefix + key]
        state[prefix + "weight"] = layer.dequantized_weight(dtype).contiguous()
    return state


def export_dense(model, directory: str, dtype: torch.dtype | None = None) -> None:
    """Write a normal transformers checkpoint (``from_pretrained`` loads it, no hf_lowrank needed)."""
    _config_of(model)
    model.save_pretrained(directory, state_dict=dense_state_dict(model, dtype))


def _config_of(model) -> QGaLoreConfig:
    config = getattr(model, "qgalore_config", None)
    if config is None:
        raise ValueError("This model was not prepared with prepare_model_for_qgalore (no `qgalore_config`).")
    return config
