"""CoLM: zeroth-order features, facility location, budgets and weights, the weighted loss, errors, LoRA and GPT-2."""
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_lowrank.colm import (CoLMConfig, CoLMTrainer, backprop_features, facility_location_value, find_feature_block,
                             lazy_greedy, medoid_weights, plan_batch, source_budgets, zeroth_order_features)
from hf_lowrank.colm.features import directions, per_example_loss
from hf_lowrank.colm.selection import similarity_matrix

from conftest import make_tiny_llama


SOURCES = ["web", "web", "web", "web", "code", "code", "math", "web"]  # "math" is the small source


def make_gpt2(hidden=16, layers=2, vocab=64, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, vocab_size=vocab, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def batch(n=8, length=12, vocab=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=generator)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def dataset(n=48, length=12, vocab=64, sources=SOURCES):
    b = batch(n, length, vocab)
    return [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i], "labels": b["labels"][i],
             "source": sources[i % len(sources)]} for i in range(n)]


def args(tmp_path, batch_size=8, steps=2, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             disable_tqdm=True, dataloader_drop_last=True, **kwargs)


def trainer(tmp_path, model=None, config=None, batch_size=8, steps=2, data=None, **kwargs):
    model = model if model is not None else make_tiny_llama(vocab=64)
    return CoLMTrainer(model=model, args=args(tmp_path, batch_size, steps, **kwargs),
                       colm_config=config or CoLMConfig(small_sources=["math"]),
                       train_dataset=data if data is not None else dataset(), data_collator=default_data_collator)


def autograd_per_example(model, block, inputs):
    """Exact gradient of each example's mean next-token loss w.r.t. the feature block (flattened)."""
    rows = []
    for i in range(inputs["labels"].shape[0]):
        model.zero_grad()
        logits = model(input_ids=inputs["input_ids"][i:i + 1], attention_mask=inputs["attention_mask"][i:i + 1]).logits
        total, count = per_example_loss(logits, inputs["labels"][i:i + 1])
        (total / count).sum().backward()
        rows.append(block.parameter.grad[block.index].flatten().clone())
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zeroth_order_matches_autograd(arch):
    model = (make_tiny_llama(hidden=8, heads=2, intermediate=16, vocab=32) if arch == "llama"
             else make_gpt2(hidden=8, vocab=32)).double().eval()
    block = find_feature_block(model)
    inputs = batch(n=4, vocab=32)
    exact = autograd_per_example(model, block, inputs)
    # One direction: the finite difference is the directional derivative g . z (to ~1e-4: LLaMA's rotary tables
    # stay float32 in a float64 model, so the loss carries float32 rounding).
    z = directions(block, 0, (0, 0), 1)
    one = zeroth_order_features(model, block, inputs, z, 1e-3, chunk_size=2)
    torch.testing.assert_close(one, (exact @ z[0])[:, None] * z, rtol=1e-3, atol=1e-5)
    # Averaged over many directions the estimate points along the gradient.
    z = directions(block, 0, (1, 0), 1024)
    mean = zeroth_order_features(model, block, inputs, z, 1e-3, chunk_size=4)
    cosine = torch.nn.functional.cosine_similarity(mean, exact, dim=1)
    assert cosine.mean() > 0.9, cosine


def test_prefix_reuse_gives_the_same_features():
    model = make_tiny_llama(layers=3, vocab=64).double().eval()
    block = find_feature_block(model)
    assert block.name == "model.layers.2.self_attn.v_proj" and block.block_index == 2
    inputs = batch()
    z = directions(block, 3, (0, 0), 2)
    before = block.parameter.detach().clone()
    reused = zeroth_order_features(model, block, inputs, z, 1e-3, chunk_size=3, reuse_prefix=True)
    plain = zeroth_order_features(model, block, inputs, z, 1e-3, chunk_size=8, reuse_prefix=False)
    torch.testing.assert_close(reused, plain)
    assert torch.equal(block.parameter, before)  # restored exactly
    assert "forward" not in vars(model.model.layers[0])  # the reuse patch is gone


def feature_model(arch):
    from peft import LoraConfig, get_peft_model

    if arch.startswith("llama"):
        model = make_tiny_llama(hidden=8, heads=2, intermediate=16, vocab=32)
    else:
        model = make_gpt2(hidden=8, vocab=32)
    if arch == "llama-lora":
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    elif arch == "gpt2-lora":
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 init_lora_weights=False))
    return model.double().eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-lora", "gpt2-lora"])
def test_backprop_features_are_the_exact_per_example_gradients(arch):
    model = feature_model(arch)
    block = find_feature_block(model)
    inputs = batch(n=5, vocab=32)
    exact = autograd_per_example(model, block, inputs)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for chunk in (2, 5):
        features = backprop_features(model, block, inputs, chunk_size=chunk)
        torch.testing.assert_close(features, exact, rtol=1e-10, atol=1e-12)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags  # restored
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # no .grad written
    assert not block.module._forward_hooks  # the capture hook is gone


def test_backprop_features_train_and_reject_zeroth_order_options(tmp_path):
    trainer(tmp_path, config=CoLMConfig(features="backprop", matching_every=1)).train()
    with pytest.raises(ValueError, match=r"\['num_directions'\] only apply to features='zeroth_order'"):
        CoLMConfig(features="backprop", num_directions=4)
    with pytest.raises(ValueError, match="`features`='exact'; use one of"):
        CoLMConfig(features="exact")


def greedy_by_brute_force(similarity, k):
    chosen = []
    for _ in range(k):
        gains = [(facility_location_value(similarity, chosen + [j]), -j) for j in range(len(similarity))
                 if j not in chosen]
        chosen.append(-max(gains)[1])
    return chosen


@pytest.mark.parametrize("kind", ["l1", "l2", "cosine"])
def test_lazy_greedy_equals_brute_force(kind):
    bound = 1 - 1 / math.e
    for trial in range(20):
        n = 3 + trial % 6  # 3..8
        features = torch.randn(n, 5, generator=torch.Generator().manual_seed(trial))
        s = similarity_matrix(features, kind)
        assert (s >= 0).all()
        for k in range(1, n + 1):
            picks = lazy_greedy(s, k)
            greedy = greedy_by_brute_force(s.double(), k)  # (float rounding may swap exact ties, not the value)
            assert facility_location_value(s, picks) == pytest.approx(facility_location_value(s, greedy), rel=1e-6)
            assert len(set(picks)) == k
            best = max(facility_location_value(s, c) for c in itertools.combinations(range(n), k))
            assert facility_location_value(s, picks) >= bound * best - 1e-5
            if k == 1:
                assert facility_location_value(s, picks) == pytest.approx(best)


def test_medoid_weights_and_budgets():
    s = similarity_matrix(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), "l1")
    medoids = lazy_greedy(s, 4)
    weights = medoid_weights(s, medoids)
    assert weights.sum() == 10 and (weights >= 1).all()
    assert source_budgets({"a": 10, "b": 5, "c": 1}, 8) == {"a": 5, "b": 2, "c": 1}
    assert sum(source_budgets({"a": 61, "b": 2}, 32).values()) == 32
    assert source_budgets({"a": 3, "b": 3}, 1) == {"a": 1, "b": 1}  # one medoid per source at least
    plan = plan_batch(SOURCES, {"math"}, 4)
    assert plan.keep == [6] and plan.budgets == {"web": 2, "code": 1}


def test_coreset_keeps_small_sources_and_weights_sum_to_the_rest(tmp_path):
    t = trainer(tmp_path)
    inputs = batch()
    rows, weights = t.select_coreset(t.model, inputs, list(SOURCES))
    assert len(rows) == 4  # 0.5 x 8
    assert 6 in rows.tolist() and weights[rows.tolist().index(6)] == 1  # the small source, weight 1
    large = [i for i, r in enumerate(rows.tolist()) if SOURCES[r] != "math"]
    assert weights[large].sum() == sum(s != "math" for s in SOURCES)
    assert {SOURCES[r] for r in rows.tolist()} == {"web", "code", "math"}


def test_random_selection_ablation_keeps_small_sources_with_uniform_weights(tmp_path):
    import hf_lowrank

    assert hf_lowrank.CoLMTrainer is CoLMTrainer and hf_lowrank.CoLMConfig is CoLMConfig
    t = trainer(tmp_path, config=CoLMConfig(small_sources=["math"], selection="random"))
    rows, weights = t.select_coreset(t.model, batch(), list(SOURCES))
    by_source = {SOURCES[r]: float(w) for r, w in zip(rows.tolist(), weights)}
    assert by_source == {"math": 1.0, "web": 2.5, "code": 2.0} and weights.sum() == len(SOURCES)


@pytest.mark.parametrize("rule, expected", [
    ("uniform", {"math": 1.0, "web": 2.5, "code": 2.0}),  # count / budget per medoid, the stratified weights
    ("equal", {"math": 2.0, "web": 2.0, "code": 2.0}),  # the official default: n / |coreset| for every row
])
def test_medoid_weight_rules_reweigh_the_same_coreset(tmp_path, rule, expected):
    clustered = trainer(tmp_path, config=CoLMConfig(small_sources=["math"]))
    other = trainer(tmp_path, config=CoLMConfig(small_sources=["math"], medoid_weights=rule))
    rows_c, _ = clustered.select_coreset(clustered.model, batch(), list(SOURCES))
    rows, weights = other.select_coreset(other.model, batch(), list(SOURCES))
    assert torch.equal(rows_c, rows)
    assert {SOURCES[r]: float(w) for r, w in zip(rows.tolist(), weights)} == expected
    assert weights.sum() == len(SOURCES)
    ablation = trainer(tmp_path, config=CoLMConfig(small_sources=["math"], selection="random", medoid_weights=rule))
    rows, weights = ablation.select_coreset(ablation.model, batch(), list(SOURCES))
    assert {SOURCES[r]: float(w) for r, w in zip(rows.tolist(), weights)} == expected


def test_medoid_weights_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="medoid_weights"):
        CoLMConfig(medoid_weights="size")


def test_selection_is_deterministic_under_a_seed(tmp_path):
    inputs = batch(n=16, seed=1)
    sources = ["web"] * 12 + ["code"] * 4

    def select(seed):
        t = trainer(tmp_path, config=CoLMConfig(seed=seed, similarity="l2"), batch_size=16)
        return [t.select_coreset(t.model, inputs, sources) for _ in range(2)]  # two micro-batches of step 0

    first, again, other = select(0), select(0), select(1)
    for (r1, w1), (r2, w2) in zip(first, again):
        assert torch.equal(r1, r2) and torch.equal(w1, w2)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ratio_one_trains_exactly_like_trainer(tmp_path, accumulation):
    data = dataset(n=16)
    plain = make_tiny_llama(vocab=64)
    colm = make_tiny_llama(vocab=64)
    common = dict(gradient_accumulation_steps=accumulation, seed=0)
    reference = Trainer(model=plain, args=args(tmp_path / "a", steps=2, **common),
                        train_dataset=[{k: v for k, v in r.items() if k != "source"} for r in data],
                        data_collator=default_data_collator)
    reference.train()
    t = trainer(tmp_path / "b", model=colm, config=CoLMConfig(coreset_ratio=1.0), data=data, steps=2, **common)
    t.train()
    for p, q in zip(plain.parameters(), colm.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # two Adam steps; the sums run in another order


def test_training_logs_selection_coverage_and_matching(tmp_path):
    t = trainer(tmp_path, config=CoLMConfig(small_sources=["math"], matching_every=1), steps=2)
    t.train()
    log = next(entry for entry in t.state.log_history if "loss" in entry)
    assert log["colm/coverage/math"] == 1.0
    assert 0 < log["colm/coverage/web"] < 1 and log["colm/coreset_size"] == 4
    assert log["colm/selection_seconds"] > 0
    assert -1 <= log["colm/matching_cosine"] <= 1 and -1 <= log["colm/matching_cosine_random"] <= 1
    t._save(str(tmp_path / "ckpt"))  # the normalisation history is saved as plain tensors
    state = torch.load(tmp_path / "ckpt" / "colm_state.pt", weights_only=True)
    assert torch.equal(state["adam_m"], t._adam_m) and state["adam_v"].shape == (t.feature_block.dim,)
    resumed = trainer(tmp_path / "resumed", config=CoLMConfig(small_sources=["math"]))
    resumed._load_from_checkpoint(str(tmp_path / "ckpt"))
    assert torch.equal(resumed._adam_v, t._adam_v)
    for p, q in zip(resumed.model.parameters(), t.model.parameters()):
        assert torch.equal(p, q)


def test_lora_features_use_lora_b_and_gpt2_the_value_columns(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(make_tiny_llama(vocab=64), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    block = find_feature_block(lora)
    assert block.name.endswith("layers.1.self_attn.v_proj") and block.parameter is (
        lora.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight)
    trainer(tmp_path / "lora", model=lora, config=CoLMConfig(matching_every=1)).train()

    gpt2 = make_gpt2()
    block = find_feature_block(gpt2)
    assert block.name == "transformer.h.1.attn.c_attn" and block.view.shape == (16, 16)
    assert block.view.data_ptr() == gpt2.transformer.h[1].attn.c_attn.weight[:, 32:].data_ptr()
    trainer(tmp_path / "gpt2", model=gpt2).train()
    lora2 = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    assert find_feature_block(lora2).view.shape == (16, 4)  # the V rows of lora_B (3h x r)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="coreset_ratio"):
        CoLMConfig(coreset_ratio=0)
    with pytest.raises(ValueError, match="coreset_ratio"):
        CoLMConfig(coreset_ratio=1.5)
    with pytest.raises(ValueError, match="small_sources` or `small_source_fraction"):
        CoLMConfig(small_sources=["a"], small_source_fraction=0.1)
    with pytest.raises(ValueError, match="source_column='domain' is not a column"):
        trainer(tmp_path, config=CoLMConfig(source_column="domain"))
    with pytest.raises(ValueError, match="feature_module`='nope' matched no"):
        trainer(tmp_path, config=CoLMConfig(feature_module="nope"))
    with pytest.raises(ValueError, match="must match one module"):
        trainer(tmp_path, config=CoLMConfig(feature_module=r".*v_proj"))
    t = trainer(tmp_path)
    with pytest.raises(KeyError, match="no 'source'"):
        t.training_step(t.model, batch())


def test_small_source_fraction_counts_the_training_set(tmp_path):
    t = trainer(tmp_path, config=CoLMConfig(small_source_fraction=0.2))
    assert t.small_sources == {"math"}  # 1/8 of the examples; code is 2/8


@pytest.mark.device
def test_selection_on_device(tmp_path, device):
    model = make_tiny_llama(vocab=64).to(device)
    block = find_feature_block(model)
    inputs = {k: v.to(device) for k, v in batch().items()}
    z = directions(block, 0, (0, 0), 1)
    assert z.device.type == device.type
    features = zeroth_order_features(model.eval(), block, inputs, z, 1e-3, chunk_size=4)
    exact = backprop_features(model, block, inputs, chunk_size=4)
    assert features.shape == exact.shape == (8, block.dim) and exact.device.type == device.type
    assert torch.isfinite(features).all() and torch.isfinite(exact).all()
    cpu_inputs = {k: v.cpu() for k, v in inputs.items()}
    cpu_block = find_feature_block(model.cpu())
    cpu = zeroth_order_features(model, cpu_block, cpu_inputs, z.cpu(), 1e-3, chunk_size=4)
    torch.testing.assert_close(features.cpu(), cpu, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(exact.cpu(), backprop_features(model, cpu_block, cpu_inputs, chunk_size=4),
                               rtol=1e-3, atol=1e-5)


def ddp_worker(out_dir: str) -> None:
    """Under torchrun (2 gloo processes): ratio 1 trains like Trainer, and a coreset run keeps replicas equal."""
    import json
    import os

    torch.set_num_threads(1)
    data, out = dataset(n=32), Path(out_dir)
    common = dict(steps=2, gradient_accumulation_steps=2, ddp_backend="gloo")
    plain, colm, coreset = (make_tiny_llama(vocab=64) for _ in range(3))
    Trainer(model=plain, args=args(out / "a", **common), data_collator=default_data_collator,
            train_dataset=[{k: v for k, v in r.items() if k != "source"} for r in data]).train()
    for model, config, name in ((colm, CoLMConfig(coreset_ratio=1.0), "b"),
                                (coreset, CoLMConfig(small_sources=["math"]), "c")):
        t = CoLMTrainer(model=model, args=args(out / name, **common), colm_config=config, train_dataset=data,
                        data_collator=default_data_collator)
        assert t.args.world_size == 2
        t.train()
    record = {"diff": max((p - q).abs().max().item() for p, q in zip(plain.parameters(), colm.parameters())),
              "coreset": [float(p.double().sum()) for p in coreset.parameters()]}
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_semantics(tmp_path):
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}:{root / 'tests'}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path)]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["diff"] < 1e-5 for r in ranks)  # coreset_ratio 1 under DDP + accumulation == Trainer
    assert ranks[0]["coreset"] == ranks[1]["coreset"]  # replicas stay identical


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
