"""Offline stand-ins for the MMLU / commonsense recipe tests: a tiny byte-level BPE tokenizer trained on the shipped
data, a tiny LLaMA saved next to it, and a stub LM whose logits favour chosen tokens."""
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn


REPO = Path(__file__).resolve().parents[1]


def train_tiny_tokenizer(vocab_size: int = 512):
    """Byte-level BPE (GPT-2 style, like SmolLM2's) trained in well under a second on shipped MMLU/commonsense text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = (REPO / "data" / "mmlu" / "dev.csv").read_text().splitlines()
    texts += (REPO / "data" / "commonsense" / "piqa" / "test.json").read_text().splitlines()[:400]
    texts += ["Answer: A\nAnswer: B\nAnswer: C\nAnswer: D\nthe correct answer is true false answer1 answer2"] * 500
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def save_tiny_causal_lm(folder: Path, seed: int = 0) -> Path:
    """A 2-layer LLaMA (hidden 64) + the tiny tokenizer saved as a from_pretrained folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class FavouringLM(nn.Module):
    """Causal-LM stub: every position predicts the same distribution, with `bonus` added to `favoured` token ids."""

    def __init__(self, vocab_size: int, favoured, bonus: float = 5.0):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.weight = nn.Parameter(torch.zeros(()))
        self.register_buffer("bias", torch.zeros(vocab_size))
        self.bias[list(favoured)] = bonus

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        logits = self.bias.expand(*input_ids.shape, -1) + self.weight
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)
