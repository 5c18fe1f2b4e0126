"""Shared fixtures: offline, one thread, tiny models built from configs."""
import os
import tempfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every available device: device-sensitive tests (marked ``device``) also run on CUDA when one is present."""
    return torch.device(request.param)


def prepare_for_mode(model, mode):
    """Modes that train quantized weights (``q_galore``) need a prepared model; groups of 64 fit the tiny models."""
    from hf_lowrank.optim import get_mode

    if get_mode(mode).quantized_weights:
        from hf_lowrank.qgalore import prepare_model_for_qgalore

        prepare_model_for_qgalore(model, group_size=64)
    return model


def make_tiny_llama(hidden=64, layers=2, intermediate=128, vocab=256, heads=4, seed=0, tie_word_embeddings=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
