"""`CoLMTrainer`: a `transformers.Trainer` that trains each large batch's weighted mini-batch coreset (CoLM)."""
import os
import time
from collections import Counter
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .config import CoLMConfig
from .features import backprop_features, directions, find_feature_block, per_example_loss, zeroth_order_features
from .selection import plan_batch, select_medoids


logger = logging.get_logger(__name__)

STATE_FILE = "colm_state.pt"


class SourceCollator:
    """Wraps a collator: the source column is taken out of every example before collating and added back to the
    batch as a list, so any collator (padding, language modelling) works with str or int sources."""

    def __init__(self, collator, column: str):
        self.collator, self.column = collator, column

    def __call__(self, features):
        if not features or not isinstance(features[0], Mapping) or self.column not in features[0]:
            return self.collator(features)
        sources = [f[self.column].item() if torch.is_tensor(f[self.column]) else f[self.column] for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch[self.column] = sources
        return batch


def _rows(inputs: dict, rows: torch.Tensor, n: int) -> dict:
    """The batch restricted to ``rows`` (every per-example tensor or list; other entries as they are)."""
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.shape[:1] == (n,):
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


def _column_values(dataset, column: str) -> list:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(dataset[column])
    return [dataset[i][column] for i in range(len(dataset))]


def _check_column(dataset, column: str) -> None:
    names = getattr(dataset, "column_names", None)
    if names is None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset):
        first = dataset[0]
        names = list(first) if isinstance(first, Mapping) else None
    if names is not None and column not in names:
        raise ValueError(f"CoLMConfig.source_column={column!r} is not a column of train_dataset (columns: "
                         f"{sorted(names)}). Add each example's source under that name, or set source_column.")


class CoLMTrainer(Trainer):
    """Trainer whose every training micro-batch is a large batch (``per_device_train_batch_size``) from which a
    coreset of ``coreset_ratio`` x its size is trained on (CoLM, ICLR 2025): small sources kept whole, medoids of
    each large source's gradient features (zeroth-order, or exact with ``features="backprop"``) chosen by facility
    location, each weighted by its cluster size. Only the coreset runs forward + backward with activations kept
    (the exact features keep those of the layers above the block for one chunk), so peak memory is that of the
    small batch.

    The loss is the weighted token sum over the coreset divided by the large batch's label-token count (the one
    Trainer computes over all accumulated micro-batches), so each step's loss estimates the standard loss of the
    whole accumulated large batch; without that count, the weighted token mean of the coreset. Gradient
    accumulation selects per micro-batch; under DDP every process selects from its own large batch and DDP averages
    the gradients as usual. FSDP, DeepSpeed and multi-GPU DataParallel are refused (the features perturb or
    differentiate the whole feature weight in one module).

    Training logs add ``colm/selection_seconds`` (mean per selection), ``colm/coreset_size``, ``colm/coverage/<s>``
    (share of source s's examples that were trained on) and, every ``matching_every`` steps,
    ``colm/matching_cosine`` (coreset vs full large-batch gradient of the trainable parameters) and
    ``colm/matching_cosine_random`` (a uniform random subset of the same size). The Adam-normalisation history is
    saved with checkpoints (``colm_state.pt``, tensors only).
    """

    def __init__(self, model: nn.Module = None, args=None, colm_config: Optional[CoLMConfig] = None, **kwargs):
        if colm_config is not None and not isinstance(colm_config, CoLMConfig):
            raise TypeError(f"`colm_config` must be a CoLMConfig, got {type(colm_config).__name__}.")
        self.colm_config = colm_config if colm_config is not None else CoLMConfig()
        super().__init__(model=model, args=args, **kwargs)
        self._check_setup()
        column = self.colm_config.source_column
        self.data_collator = SourceCollator(self.data_collator, column)
        self.feature_block = find_feature_block(self.model, self.colm_config.feature_module)
        block = self.feature_block
        if block.parameter.dtype not in (torch.float32, torch.float64):
            logger.warning(f"CoLM: the feature weight {block.name} is {block.parameter.dtype}; a perturbation of "
                           f"epsilon={self.colm_config.epsilon} may round away. Keep that weight (or its LoRA factor) "
                           "in float32.")
        self.small_sources = self._resolve_small_sources()
        self._adam_m = self._adam_v = None
        self._coreset_weights = None
        self._step_key = (None, 0)
        self._reset_stats()

    # -- setup -----------------------------------------------------------------------------------------------
    def _check_setup(self) -> None:
        if self.args.n_gpu > 1:
            raise ValueError(f"CoLMTrainer runs one device per process (n_gpu is {self.args.n_gpu}); launch with "
                             "torchrun/accelerate (DDP) instead of DataParallel.")
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError("CoLMTrainer does not support FSDP or DeepSpeed: the zeroth-order features perturb one "
                             "whole weight in place, which is sharded there. Use DDP.")
        if self.colm_config.matching_every and self.args.world_size > 1:
            raise ValueError("CoLMConfig.matching_every needs a single process (it backpropagates outside DDP); set "
                             "it to 0 for multi-process runs.")
        if self.train_dataset is not None:
            _check_column(self.train_dataset, self.colm_config.source_column)

    def _resolve_small_sources(self) -> set:
        cfg = self.colm_config
        if cfg.small_sources is not None:
            return set(cfg.small_sources)
        if cfg.small_source_fraction is None:
            return set()
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError("CoLMConfig.small_source_fraction counts sources in train_dataset, which is missing or "
                             "has no length (an IterableDataset); pass small_sources explicitly.")
        counts = Counter(_column_values(self.train_dataset, cfg.source_column))
        total = sum(counts.values())
        small = {s for s, n in counts.items() if n / total < cfg.small_source_fraction}
        logger.info(f"CoLM: small sources (share < {cfg.small_source_fraction}): {sorted(map(str, small))}")
        return small

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.colm_config.source_column not in self._signature_columns:
            self._signature_columns.append(self.colm_config.source_column)

    # -- training --------------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        column = self.colm_config.source_column
        if column not in inputs:
            raise KeyError(f"CoLM: the training batch has no {column!r} (CoLMConfig.source_column); got keys "
                           f"{sorted(inputs)}. Give every training example its source under that name.")
        if "labels" not in inputs:
            raise KeyError(f"CoLM: the training batch has no 'labels' (got {sorted(inputs)}); use a causal-LM "
                           "collator (e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)).")
        sources = list(inputs.pop(column))
        rows, weights = self.select_coreset(model, inputs, sources)
        coreset = _rows(inputs, rows, len(sources))
        if self._matching_due():
            self._log_matching(inputs, rows, weights)
        self._coreset_weights = weights.to(inputs["labels"].device)
        try:
            return super().training_step(model, coreset, num_items_in_batch)
        finally:
            self._coreset_weights = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != self.colm_config.source_column}
        weights = self._coreset_weights
        if weights is None:  # evaluation, prediction
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        totals, counts = per_example_loss(outputs.logits, labels)
        weighted = (weights * totals).sum()
        if num_items_in_batch is not None:
            loss = weighted / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages; the count is over all processes
            self.loss_is_scaled_for_ga = True
        else:
            loss = weighted / (weights * counts).sum().clamp_min(1)
            self.loss_is_scaled_for_ga = False
        return (loss, outputs) if return_outputs else loss

    # -- selection -------------------------------------------------------------------------------------------
    def _next_key(self) -> tuple[int, int]:
        step, micro = self._step_key
        micro = micro + 1 if step == self.state.global_step else 0
        self._step_key = (self.state.global_step, micro)
        return self._step_key

    def select_coreset(self, model: nn.Module, inputs: dict, sources: list) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, weights)`` of the coreset of one large batch (``inputs`` without the source column)."""
        cfg = self.colm_config
        start = time.perf_counter()
        n = len(sources)
        plan = plan_batch(sources, self.small_sources, cfg.coreset_size(n))
        rows, weights = list(plan.keep), [1.0] * len(plan.keep)
        selected = [s for s in plan.groups if plan.budgets[s] < len(plan.groups[s])]
        for s in plan.groups:
            if s not in selected:
                rows += plan.groups[s]
                weights += [1.0] * len(plan.groups[s])
        key = self._next_key()
        if selected and cfg.selection == "random":
            generator = self._generator(*key, 2)
            for s in selected:
                group, budget = plan.groups[s], plan.budgets[s]
                rows += [group[j] for j in torch.randperm(len(group), generator=generator)[:budget].tolist()]
                weights += [len(group) / budget] * budget
        elif selected:
            candidates = [i for s in selected for i in plan.groups[s]]
            features = self._features(model, _rows(inputs, torch.tensor(candidates), n), key)
            features, m, v = self._normalize(features)
            picked, offset = [], 0
            for s in selected:
                group = plan.groups[s]
                medoids, medoid_weights = select_medoids(features[offset:offset + len(group)], plan.budgets[s],
                                                         cfg.similarity, cfg.sparse_dim)
                rows += [group[j] for j in medoids]
                weights += (medoid_weights.tolist() if cfg.medoid_weights == "cluster"
                            else [len(group) / len(medoids)] * len(medoids))
                picked += [offset + j for j in medoids]
                offset += len(group)
            if m is not None:
                self._adam_m, self._adam_v = m[picked].mean(dim=0), v[picked].mean(dim=0)
        if cfg.medoid_weights == "equal":
            weights = [n / len(rows)] * len(rows)
        stats = self._stats
        stats["seconds"] += time.perf_counter() - start
        stats["selections"] += 1
        stats["size"] += len(rows)
        stats["present"].update(sources)
        stats["trained"].update(sources[i] for i in rows)
        return torch.tensor(rows), torch.tensor(weights, dtype=torch.float32)

    def _generator(self, *key: int) -> torch.Generator:
        """A CPU generator that is a function of (seed, *key) only (no saved RNG state needed on resume)."""
        state = int(np.random.SeedSequence([self.colm_config.seed, *key]).generate_state(1)[0])
        return torch.Generator().manual_seed(state)

    def _features(self, model: nn.Module, inputs: dict, key: tuple[int, int]) -> torch.Tensor:
        cfg = self.colm_config
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()  # no dropout in the finite differences
        try:
            chunk = cfg.feature_batch_size or cfg.coreset_size(self.args.per_device_train_batch_size)
            with self.compute_loss_context_manager():
                if cfg.features == "backprop":
                    return backprop_features(unwrapped, self.feature_block, inputs, chunk)
                z = directions(self.feature_block, cfg.seed, key, cfg.num_directions)
                return zeroth_order_features(unwrapped, self.feature_block, inputs, z, cfg.epsilon, chunk,
                                             cfg.reuse_prefix)
        finally:
            unwrapped.train(was_training)

    def _normalize(self, features: torch.Tensor):
        """Adam updates m_hat / (sqrt(v_hat) + eps) of every example from the shared history (or the raw
        features), plus each example's m and v."""
        cfg = self.colm_config
        if not cfg.adam_normalize:
            return features, None, None
        beta1, beta2 = cfg.adam_betas
        t = self.state.global_step + 1
        m_prev = self._adam_m if self._adam_m is not None else torch.zeros_like(features[0])
        v_prev = self._adam_v if self._adam_v is not None else torch.zeros_like(features[0])
        m_prev, v_prev = m_prev.to(features), v_prev.to(features)
        m = beta1 * m_prev + (1 - beta1) * features
        v = beta2 * v_prev + (1 - beta2) * features.square()
        update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + cfg.adam_epsilon)
        return update, m, v

    # -- gradient matching -----------------------------------------------------------------------------------
    def _matching_due(self) -> bool:
        every = self.colm_config.matching_every
        step = self.state.global_step
        if not every or step % every or step == self._stats.get("matching_step"):
            return False
        self._stats["matching_step"] = step
        return True

    def _gradient(self, model: nn.Module, inputs: dict, weights: torch.Tensor, chunk: int) -> torch.Tensor:
        """Flat gradient of sum_i w_i * (token-loss sum of example i) over the trainable parameters, in chunks."""
        params = [p for p in model.parameters() if p.requires_grad]
        n = inputs["labels"].shape[0]
        flat = None
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(n, start + chunk))
            part = _rows(inputs, rows, n)
            with self.compute_loss_context_manager():
                logits = model(**{k: v for k, v in part.items() if k != "labels"}).logits
                totals, _ = per_example_loss(logits, part["labels"])
            grads = torch.autograd.grad((weights[rows.to(weights.device)] * totals).sum(), params, allow_unused=True)
            g = torch.cat([(torch.zeros_like(p) if g is None else g).flatten().float() for g, p in zip(grads, params)])
            flat = g if flat is None else flat + g
        return flat

    def _log_matching(self, inputs: dict, rows: torch.Tensor, weights: torch.Tensor) -> None:
        model = self.accelerator.unwrap_model(self.model)
        n, k = inputs["labels"].shape[0], len(rows)
        device = inputs["labels"].device
        full = self._gradient(model, inputs, torch.ones(n, device=device), k)
        core = self._gradient(model, _rows(inputs, rows, n), weights.to(device), k)
        uniform = torch.randperm(n, generator=self._generator(self.state.global_step, 1))[:k]
        random = self._gradient(model, _rows(inputs, uniform, n), torch.full((k,), n / k, device=device), k)
        cosine = nn.functional.cosine_similarity
        self._stats["matching"].append(float(cosine(core, full, dim=0)))
        self._stats["matching_random"].append(float(cosine(random, full, dim=0)))

    # -- logs and checkpoints --------------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        kept = getattr(self, "_stats", {}).get("matching_step")
        self._stats = {"seconds": 0.0, "selections": 0, "size": 0, "present": Counter(), "trained": Counter(),
                       "matching": [], "matching_random": [], "matching_step": kept}

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        stats = self._stats
        if "loss" in logs and stats["selections"]:
            logs["colm/selection_seconds"] = round(stats["seconds"] / stats["selections"], 6)
            logs["colm/coreset_size"] = round(stats["size"] / stats["selections"], 3)
            for source in sorted(stats["present"], key=str):
                logs[f"colm/coverage/{source}"] = round(stats["trained"][source] / stats["present"][source], 4)
            if stats["matching"]:
                logs["colm/matching_cosine"] = round(float(np.mean(stats["matching"])), 6)
                logs["colm/matching_cosine_random"] = round(float(np.mean(stats["matching_random"])), 6)
            self._reset_stats()
        super().log(logs, start_time)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and self._adam_m is not None:
            torch.save({"adam_m": self._adam_m.cpu(), "adam_v": self._adam_v.cpu()},
                       os.path.join(output_dir, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if os.path.isfile(path):
            state = torch.load(path, weights_only=True)
            device = self.feature_block.parameter.device
            self._adam_m, self._adam_v = state["adam_m"].to(device), state["adam_v"].to(device)
