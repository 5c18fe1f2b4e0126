"""Multiple-choice scoring for causal LMs, shared by the MMLU and commonsense recipes.

``score_continuations`` returns log p(candidate | context) for every candidate of every example, computed
efficiently on CPU:

* candidates of one example share one forward pass whenever they can: each candidate needs the logits of
  ``context + candidate[:-1]``, and a single row serves every candidate whose input is a prefix of it, so
  single-token answers (" A".." D", " true"/" false", " answer1".." answer4") cost one pass per example;
* rows of many examples are batched, left-padded with explicit position ids (scores equal unbatched ones), sorted
  by length to limit padding, and only the last positions' logits are materialised (``logits_to_keep``).

``generate_answers`` is the generation side of the LLM-Adapters protocol (greedy or beam decoding, batched);
``shots_label`` and ``set_tag`` name evaluation runs in results files.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class CandidateScore:
    logprob: float  # sum of the candidate tokens' log-probabilities
    num_tokens: int
    num_chars: int  # for lm-eval-harness style length normalisation (acc_norm)


@dataclass
class _Row:
    input_ids: list[int]
    first_scored: int  # earliest position whose logits some candidate reads


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def model_max_length(model) -> Optional[int]:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.no_grad()
def score_continuations(
    model,
    tokenizer,
    contexts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    batch_size: int = 8,
    max_length: Optional[int] = None,
    progress: bool = False,
) -> list[list[CandidateScore]]:
    """Log-likelihood of each candidate string after its context (``candidates[i]`` belong to ``contexts[i]``).

    Candidates are scored as written: put the separating space in the candidate (" A"), not at the end of the
    context. Inputs longer than ``max_length`` (default: the model's ``max_position_embeddings``) lose the start
    of their context, as in lm-evaluation-harness.
    """
    if len(contexts) != len(candidates):
        raise ValueError(f"got {len(contexts)} contexts but {len(candidates)} candidate lists.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    max_length = max_length or model_max_length(model)
    rows: list[_Row] = []
    # lookups[i][j] = (row index, position of the first candidate token in that row, candidate token ids)
    lookups: list[list[tuple[int, int, list[int]]]] = []
    for context, options in zip(contexts, candidates):
        if not options:
            raise ValueError(f"context {context[:60]!r}... has no candidates.")
        context_ids = _encode(tokenizer, context, special=True)
        needs = []
        for option in options:
            option_ids = _encode(tokenizer, option, special=False)
            if not option_ids:
                raise ValueError(f"candidate {option!r} encodes to no tokens.")
            full = context_ids + option_ids
            if max_length and len(full) > max_length + 1:
                full = full[-(max_length + 1):]
            start = len(full) - 1 - len(option_ids)
            if start < 0:
                raise ValueError(
                    f"candidate {option!r} leaves no context to condition on (empty context, or the candidate "
                    f"alone exceeds max_length={max_length})."
                )
            needs.append((full[:-1], start, option_ids))
        example_rows: list[int] = []
        example_lookups: list = [None] * len(options)
        for j in sorted(range(len(options)), key=lambda j: -len(needs[j][0])):
            inputs, start, option_ids = needs[j]
            row_index = next(
                (r for r in example_rows if rows[r].input_ids[: len(inputs)] == inputs), None
            )
            if row_index is None:
                row_index = len(rows)
                rows.append(_Row(inputs, start))
                example_rows.append(row_index)
            rows[row_index].first_scored = min(rows[row_index].first_scored, start)
            example_lookups[j] = (row_index, start, option_ids)
        lookups.append(example_lookups)

    row_logprobs: dict[int, torch.Tensor] = {}  # row -> [len - first_scored, vocab] log-probs
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r].input_ids))
    was_training = model.training
    model.eval()
    try:
        for begin in tqdm(range(0, len(order), batch_size), disable=not progress, desc="scoring"):
            batch = [rows[r] for r in order[begin: begin + batch_size]]
            width = max(len(row.input_ids) for row in batch)
            keep = max(len(row.input_ids) - row.first_scored for row in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, row in enumerate(batch):
                input_ids[b, width - len(row.input_ids):] = torch.tensor(row.input_ids)
                attention_mask[b, width - len(row.input_ids):] = 1
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                logits_to_keep=keep,
            ).logits[:, -keep:]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for b, row in enumerate(batch):
                row_logprobs[order[begin + b]] = logprobs[b, keep - (len(row.input_ids) - row.first_scored):]
    finally:
        model.train(was_training)

    results = []
    for options, example_lookups in zip(candidates, lookups):
        scores = []
        for option, (row_index, start, option_ids) in zip(options, example_lookups):
            table = row_logprobs[row_index]
            offset = start - rows[row_index].first_scored
            positions = torch.arange(offset, offset + len(option_ids))
            logprob = table[positions, torch.tensor(option_ids)].sum().item()
            scores.append(CandidateScore(logprob, len(option_ids), len(option)))
        results.append(scores)
    return results


def pick(scores: Sequence[CandidateScore], normalize: str = "none") -> int:
    """Index of the best candidate: by summed log-prob ("none"), per character ("chars", lm-eval's acc_norm)
    or per token ("tokens")."""
    if normalize == "none":
        values = [s.logprob for s in scores]
    elif normalize == "chars":
        values = [s.logprob / max(s.num_chars, 1) for s in scores]
    elif normalize == "tokens":
        values = [s.logprob / s.num_tokens for s in scores]
    else:
        raise ValueError(f"`normalize` must be 'none', 'chars' or 'tokens', got {normalize!r}.")
    return max(range(len(values)), key=values.__getitem__)


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    num_beams: int = 1,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Decoded continuations of ``prompts`` (greedy, or beam search with ``num_beams`` > 1), batched and
    left-padded."""
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for begin in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generating"):
            encoded = tokenizer(list(prompts[begin: begin + batch_size]), return_tensors="pt", padding=True)
            generated = model.generate(
                input_ids=encoded["input_ids"].to(device),
                attention_mask=encoded["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
        model.train(was_training)
    return outputs


def shots_label(num_fewshot: int) -> str:
    """``zeroshot`` or ``fewshot<k>``: the label of an evaluation-only run in results file names."""
    return "zeroshot" if num_fewshot == 0 else f"fewshot{num_fewshot}"


def set_tag(names: Sequence[str]) -> str:
    """Short stable tag of a set of task or subject names for results file names: the names joined by '+' for up
    to three, else ``<count>x-<6 hex digits of their sorted list's SHA-1>`` (order-independent)."""
    unique = sorted(set(names))
    if len(unique) <= 3:
        return "+".join(unique)
    return f"{len(unique)}x-{hashlib.sha1(','.join(unique).encode()).hexdigest()[:6]}"
