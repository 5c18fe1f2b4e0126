"""recipes/pretrain.py: LLaMA sizes, packing, an end-to-end run on the shipped corpus, bad input."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import pretrain  # noqa: E402


CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "pretrain"
FAST = ["max_steps=4", "batch_size=4", "max_seq_length=32", "eval_batches=2", "eval_batch_size=4",
        "model_config.num_hidden_layers=1", "model_config.hidden_size=64", "model_config.intermediate_size=128",
        "progress=false", "logging_steps=2", "rank=8"]


@pytest.mark.parametrize("size, params_m", [("60m", 58), ("130m", 134), ("350m", 368), ("1b", 1339)])
def test_paper_model_sizes(size, params_m):
    """Parameter counts of the GaLore paper's LLaMA configs (t5-base vocab 32,100 as in GaLore's scripts)."""
    cfg = pretrain.common.load_config(pretrain.PretrainConfig, None, [f"model_size={size}"])
    config = pretrain.llama_config(cfg, vocab_size=32100)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == pytest.approx(params_m, rel=0.02)


def test_packing_is_lossless():
    tok = pretrain.Tokenizer("bytes")
    texts = ["hello world\n", "second document", "x" * 7]
    blocks = list(pretrain.pack(texts, tok, 8))
    joined = b"".join(bytes(b.tolist()) for b in blocks)
    assert all(len(b) == 8 for b in blocks) and joined == "".join(texts).encode()[: 8 * len(blocks)]


def test_end_to_end_on_shipped_corpus(tmp_path):
    metrics = pretrain.main(["--config", str(CONFIGS / "tiny_galore.yaml"), f"results_dir={tmp_path}", *FAST])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["perplexity"] < 256  # a few steps already beat the uniform byte distribution
    record = json.loads((tmp_path / "tinyshakespeare--galore--4steps--tiny.json").read_text())
    info = record["train_info"]
    assert info["steps"] == 4 and info["train_tokens_per_s"] > 0 and info["optimizer_state_bytes"] > 0
    assert info["main_metric"] == "perplexity"


def test_local_text_files(tmp_path):
    text = "To be, or not to be, that is the question.\n" * 40
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text)
    metrics = pretrain.main(["mode=adamw", f"train_file={tmp_path / 'train.txt'}", f"eval_file={tmp_path / 'val.txt'}",
                             "task=hamlet", f"results_dir={tmp_path}", *FAST])
    assert (tmp_path / "hamlet--adamw--4steps--hamlet.json").is_file() and metrics["eval_loss"] > 0


@pytest.mark.parametrize("overrides, error, message", [
    (["model_size=3b"], ValueError, "Unknown model_size '3b'. Valid sizes: tiny, 60m"),
    (["train_file=/nonexistent.txt"], FileNotFoundError, "`train_file`: file"),
    (["max_steps=-1"], ValueError, "set `max_steps`"),
    (["model_config.hiden_size=8"], ValueError, "not LlamaConfig fields"),
])
def test_bad_input(overrides, error, message):
    with pytest.raises(error, match=message):
        pretrain.main(overrides + ["progress=false", "max_seq_length=32", "eval_batches=1", "eval_batch_size=2"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = pretrain.common.load_config(pretrain.PretrainConfig, path)
    assert cfg.recipe == "pretrain" and path.stem.endswith(f"_{cfg.mode}")
    assert "accelerate launch" in path.read_text() and "hf-lowrank train" in path.read_text()
    if cfg.mode == "galore" and cfg.model_size != "tiny":  # the paper's rank / lr / scale (GaLore Table 2, App. C)
        hidden = pretrain.LLAMA_SIZES[cfg.model_size][0]
        assert (cfg.max_seq_length, cfg.scale, cfg.warmup_ratio, cfg.min_lr_ratio) == (256, 0.25, 0.1, 0.1)
        assert cfg.rank == {512: 128, 768: 256, 1024: 256, 2048: 512, 4096: 1024}[hidden]
        assert cfg.batch_size * cfg.gradient_accumulation_steps == 512


def test_q_galore_mode_prepares_the_model(tmp_path):
    metrics = pretrain.main(["mode=q_galore", "weight_group_size=64", f"results_dir={tmp_path}", *FAST])
    assert metrics["eval_loss"] < math.log(256)
    record = json.loads(next(tmp_path.glob("*q_galore*.json")).read_text())
    assert record["train_info"]["optimizer_state_bytes"] > 0
