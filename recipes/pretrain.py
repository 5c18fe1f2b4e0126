"""LLaMA pre-training from scratch with the GaLore paper's model sizes, reporting validation perplexity.

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain/llama-60m_galore.yaml
    hf-lowrank train recipes/configs/pretrain/tiny_galore.yaml max_steps=500

Model sizes (hidden / intermediate / heads / layers) follow GaLore (Zhao et al. 2024, Table 5 / App. C); training
uses seq 256, cosine decay to 10% of the peak lr after 10% linear warm-up. Text streams from a Hub dataset
(`dataset_name`, e.g. allenai/c4) or from local text files (`train_file`/`eval_file`); the offline default is the
shipped tiny Shakespeare corpus with a byte-level vocabulary (no tokenizer download).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


SHIPPED_TEXT = Path(__file__).resolve().parents[1] / "data" / "text" / "tinyshakespeare"

# hidden, intermediate, heads, layers (GaLore paper); "tiny" is ours, for CPU runs.
LLAMA_SIZES = {
    "tiny": (128, 352, 4, 4),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),  # 32 heads of 64, 24 layers (1.34B parameters with the t5 vocabulary)
    "7b": (4096, 11008, 32, 32),
}
BYTE_TOKENIZER = "bytes"


@dataclass
class PretrainConfig(common.RecipeConfig):
    recipe: str = field(default="pretrain", metadata={"help": "Recipe script this config is for."})
    task: str = field(default="tinyshakespeare", metadata={"help": "Corpus name used in results file names."})
    model_name_or_path: str = field(default="llama", metadata={"help": "Architecture family (LLaMA, from scratch)."})
    model_size: str = field(default="tiny", metadata={"help": f"LLaMA size: {', '.join(LLAMA_SIZES)}."})
    model_config: dict = field(
        default_factory=dict, metadata={"help": "LlamaConfig overrides, e.g. model_config.num_hidden_layers=2."}
    )
    tokenizer_name: str = field(
        default=BYTE_TOKENIZER, metadata={"help": "'bytes' (vocab 256, offline) or a Hub tokenizer (GaLore: t5-base)."}
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset config, e.g. 'en' for C4."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in Hub datasets."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Local training text file (offline)."})
    eval_file: Optional[str] = field(default=None, metadata={"help": "Local validation text file (offline)."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps (the stream is endless)."})
    eval_batches: int = field(default=8, metadata={"help": "Validation batches (of eval_batch_size sequences)."})
    max_seq_length: int = field(default=256, metadata={"help": "Sequence length (GaLore: 256)."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Cosine to 10% of peak lr."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "GaLore: 10% warm-up."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final lr as a fraction of the peak (GaLore: 0.1)."})
    target_modules: object = field(
        default=r".*(self_attn|mlp)\..*", metadata={"help": "Projected linears: attention + MLP (GaLore pre-training)."}
    )

    def __post_init__(self):
        if self.model_size not in LLAMA_SIZES:
            raise ValueError(f"Unknown model_size {self.model_size!r}. Valid sizes: {', '.join(LLAMA_SIZES)}.")
        if self.max_steps < 1:
            raise ValueError("Pre-training streams data: set `max_steps` (GaLore: 10K for 60M ... 150K for 7B).")
        if self.dataset_name is None and self.train_file is None and not SHIPPED_TEXT.is_dir():
            raise FileNotFoundError(f"No text corpus: {SHIPPED_TEXT} is missing; pass train_file= or dataset_name=.")
        for key in ("train_file", "eval_file"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"`{key}`: file {path!r} does not exist.")
        super().__post_init__()


def llama_config(cfg: PretrainConfig, vocab_size: int):
    from transformers import LlamaConfig

    hidden, intermediate, heads, layers = LLAMA_SIZES[cfg.model_size]
    values = dict(
        hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=heads,
        num_hidden_layers=layers, vocab_size=vocab_size, max_position_embeddings=max(1024, cfg.max_seq_length),
        tie_word_embeddings=False,
    )
    unknown = set(cfg.model_config) - set(LlamaConfig().to_dict())
    if unknown:
        raise ValueError(f"model_config keys {sorted(unknown)} are not LlamaConfig fields.")
    values.update(cfg.model_config)
    return LlamaConfig(**values)


class Tokenizer:
    """Text → token ids: UTF-8 bytes (vocab 256) or a transformers tokenizer."""

    def __init__(self, name: str):
        self.hf = None
        if name != BYTE_TOKENIZER:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(name)
        self.vocab_size = 256 if self.hf is None else len(self.hf)

    def __call__(self, text: str) -> list[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        return self.hf(text, add_special_tokens=False)["input_ids"] + [self.hf.eos_token_id or 0]


def pack(texts: Iterable[str], tokenizer: Tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Concatenate tokenized documents and cut them into `seq_len` blocks (GaLore packs C4 the same way)."""
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer(text))
        while len(buffer) >= seq_len:
            yield torch.tensor(buffer[:seq_len])
            buffer = buffer[seq_len:]


class PackedText(torch.utils.data.IterableDataset):
    """Endless stream of packed blocks from `texts()` (re-iterated each pass); one example = {input_ids, labels}."""

    def __init__(self, texts, tokenizer: Tokenizer, seq_len: int):
        self.texts, self.tokenizer, self.seq_len = texts, tokenizer, seq_len

    def __iter__(self):
        while True:
            produced = False
            for block in pack(self.texts(), self.tokenizer, self.seq_len):
                produced = True
                yield {"input_ids": block, "labels": block}
            if not produced:
                raise ValueError(f"The training text is shorter than one sequence of {self.seq_len} tokens.")


def _file_lines(path: str, chunk_lines: int = 64):
    def texts():
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        for i in range(0, len(lines), chunk_lines):
            yield "".join(lines[i : i + chunk_lines])

    return texts


def text_sources(cfg: PretrainConfig):
    """(train texts factory, eval texts factory): Hub streaming, local files, or the shipped corpus."""
    if cfg.dataset_name and not cfg.train_file:
        from datasets import load_dataset

        def split(name):
            def texts():
                stream = load_dataset(cfg.dataset_name, cfg.dataset_config, split=name, streaming=True)
                return (row[cfg.text_column] for row in stream)

            return texts

        return split("train"), split("validation")
    train = cfg.train_file or str(SHIPPED_TEXT / "train.txt")
    evaluation = cfg.eval_file or (str(SHIPPED_TEXT / "val.txt") if cfg.train_file is None else None)
    if evaluation is None:
        raise ValueError("`train_file` is set but `eval_file` is not: pass a held-out text file for perplexity.")
    return _file_lines(train), _file_lines(evaluation)


def eval_blocks(texts, tokenizer: Tokenizer, cfg: PretrainConfig) -> list[dict]:
    count = cfg.eval_batches * cfg.eval_batch_size
    blocks = [{"input_ids": b, "labels": b} for b in islice(pack(texts(), tokenizer, cfg.max_seq_length), count)]
    if not blocks:
        raise ValueError(f"The validation text is shorter than one sequence of {cfg.max_seq_length} tokens.")
    return blocks


def main(argv=None) -> dict:
    from transformers import LlamaForCausalLM, default_data_collator, set_seed

    cfg = common.parse_args(PretrainConfig, argv, recipe="pretrain")
    with common.recording_errors(cfg):
        common.check_mode(cfg.mode)
        set_seed(cfg.seed)
        tokenizer = Tokenizer(cfg.tokenizer_name)
        train_texts, eval_texts = text_sources(cfg)
        evaluation = eval_blocks(eval_texts, tokenizer, cfg)
        model = LlamaForCausalLM(llama_config(cfg, tokenizer.vocab_size))
        model, optimizer_spec = common.build_optimizer(model, cfg, task_type="CAUSAL_LM")
        min_lr = {"min_lr_rate": cfg.min_lr_ratio} if cfg.lr_scheduler_type == "cosine_with_min_lr" else {}
        trainer, meter = common.fit(
            cfg, model, optimizer_spec, PackedText(train_texts, tokenizer, cfg.max_seq_length), default_data_collator,
            lr_scheduler_kwargs=min_lr,
        )
        eval_loss = trainer.evaluate(evaluation)["eval_loss"]
        metrics = {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}
    common.logger.warning(f"{cfg.run_name}: {metrics}")
    if trainer.is_world_process_zero():
        per_step = common.examples_per_step(cfg, trainer)
        common.write_results(
            cfg, metrics, meter=meter, model=model, optimizer=trainer.optimizer, main_metric="perplexity",
            examples_per_step=per_step, tokens_per_step=per_step * cfg.max_seq_length,
        )
        if cfg.save_model or cfg.push_to_hub:
            from hf_lowrank import hub

            hub.save_pretrained(trainer.model, cfg.output_dir, results=common.results_path(cfg))
            if cfg.push_to_hub:
                hub.push_to_hub(cfg.output_dir, cfg.hub_model_id)
    return metrics


if __name__ == "__main__":
    common.run_script(main)
