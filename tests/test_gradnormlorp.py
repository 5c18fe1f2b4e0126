"""GradNormLoRP: W = m ⊙ V/‖V‖ surgery, low-rank projected direction state, merge, save/load."""
import pytest
import torch
import torch.nn as nn

from hf_lowrank.gradnormlorp import (
    GradNormLoRPConfig, GradNormLoRPModel, magnitude_and_direction, reparameterize_model,
)
from hf_lowrank.optim import ProjectedOptimizer, optimizer_state_bytes
from hf_lowrank.tuners import load_tuner
from tests.conftest import make_tiny_llama


IDS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
TARGET = "model.layers.0.self_attn.q_proj"


def train(model, optimizer, steps=4):
    losses = []
    for _ in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_reparameterisation_keeps_outputs_and_initialises_magnitude_to_row_norms():
    model = make_tiny_llama()
    weight = model.get_submodule(TARGET).weight.detach().clone()
    with torch.no_grad():
        expected = model(IDS).logits
    gnl = reparameterize_model(model, GradNormLoRPConfig())
    magnitude, direction = magnitude_and_direction(model.get_submodule(TARGET))
    assert torch.allclose(magnitude.squeeze(1), weight.norm(dim=1))
    assert torch.equal(direction, weight)
    with torch.no_grad():
        assert (model(IDS).logits - expected).abs().max() < 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.parametrizations.weight.original{i}" for t in gnl.targets for i in (0, 1)}
    assert len(gnl.targets) == 14


def test_direction_state_is_low_rank_and_below_full_adamw():
    model = make_tiny_llama()
    gnl = reparameterize_model(model, GradNormLoRPConfig(rank=4, update_proj_gap=2))
    optimizer = gnl.create_optimizer(lr=1e-3)
    assert isinstance(optimizer, ProjectedOptimizer)
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert len(projected) == 1 and projected[0]["rank"] == 4 and projected[0]["scale"] == 2.0
    losses = train(model, optimizer)
    assert losses[-1] < losses[0]
    _, direction = magnitude_and_direction(model.get_submodule(TARGET))
    state = optimizer.state[direction]
    assert state["exp_avg"].shape == (64, 4)  # 64x64 direction, right-projected to rank 4
    full = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train(model, full, steps=1)
    assert optimizer_state_bytes(optimizer) < 0.2 * optimizer_state_bytes(full)


def test_merge_writes_magnitude_times_normalised_direction():
    model = make_tiny_llama()
    gnl = reparameterize_model(model, GradNormLoRPConfig(rank=4, update_proj_gap=2))
    train(model, gnl.create_optimizer(lr=1e-2))
    magnitude, direction = (t.detach().clone() for t in magnitude_and_direction(model.get_submodule(TARGET)))
    with torch.no_grad():
        expected = model(IDS).logits
        dense = gnl.merge_and_unload()
        layer = dense.get_submodule(TARGET)
        assert type(layer) is nn.Linear and not hasattr(layer, "parametrizations")
        assert torch.allclose(layer.weight, magnitude * direction / direction.norm(dim=1, keepdim=True), atol=1e-6)
        assert (dense(IDS).logits - expected).abs().max() < 1e-5


def test_save_load_identical_logits(tmp_path):
    model = make_tiny_llama()
    gnl = reparameterize_model(model, GradNormLoRPConfig(target_modules=["q_proj", "v_proj"], rank=4))
    train(model, gnl.create_optimizer(lr=1e-2), steps=2)
    gnl.save_pretrained(tmp_path)
    loaded = load_tuner(make_tiny_llama(), str(tmp_path))
    assert isinstance(loaded, GradNormLoRPModel) and loaded.targets == gnl.targets
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, gnl(IDS).logits)


def test_trainer_with_projected_optimizer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = make_tiny_llama()
    gnl = reparameterize_model(model, GradNormLoRPConfig(rank=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = Dataset.from_dict({"input_ids": IDS.tolist(), "labels": IDS.tolist()})
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=gnl.optimizer_cls_and_kwargs(lr=1e-3))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      ProjectedOptimizer)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank"), ({"update_proj_gap": 0}, "update_proj_gap"), ({"scale": 0}, "scale"),
    ({"proj_type": "diag"}, "proj_type"), ({"projector": "fft"}, "projector"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradNormLoRPConfig(**kwargs)
