"""OwLore / LISA: outlier ratios, block sampling, the Trainer callback, released state, resume, layer-wise."""
import math

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_lowrank.optim import optimizer_state_bytes
from hf_lowrank.owlore import (
    OwLoreCallback, block_probabilities, compute_outlier_ratios, find_blocks, load_ratios, sample_blocks, save_ratios,
    setup,
)
from tests.conftest import make_tiny_llama


LAYERS = 4


def model_with_blocks(layers=LAYERS, seed=0):
    return make_tiny_llama(hidden=32, layers=layers, intermediate=64, vocab=64, heads=2, seed=seed)


def calibration(count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 16), generator=generator) for _ in range(count)]


def test_outlier_ratio_equals_a_brute_force_count():
    model = model_with_blocks()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    with torch.no_grad():
        for ids in calibration():
            model(ids)
    for hook in hooks:
        hook.remove()
    M = 3.0
    expected = []
    for block in model.model.layers:
        scores = []
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                x = torch.cat(inputs[module]).double().numpy()
                norms = np.sqrt((x ** 2).sum(0))
                scores.extend((np.abs(module.weight.detach().double().numpy()) * norms[None, :]).ravel().tolist())
        scores = np.array(scores)
        expected.append(float((scores > M * scores.mean()).sum() / scores.size))
    ratios = compute_outlier_ratios(model, calibration(), M=M)
    assert ratios == pytest.approx(expected, abs=1e-6)
    assert all(r > 0 for r in ratios)


def test_scaled_input_channels_make_their_blocks_the_most_likely():
    model = model_with_blocks()
    with torch.no_grad():
        for index in (1, 3):
            model.model.layers[index].self_attn.q_proj.weight[:, :3] *= 20
    ratios = compute_outlier_ratios(model, calibration(), M=5)
    probabilities = block_probabilities("owl", LAYERS, ratios)
    assert set(np.argsort(probabilities)[-2:]) == {1, 3}
    reverse = block_probabilities("owl_reverse", LAYERS, ratios)
    assert set(np.argsort(reverse)[:2]) == {1, 3}


def test_ten_thousand_draws_match_the_probabilities():
    from scipy.stats import chisquare

    probabilities = np.array([0.4, 0.3, 0.2, 0.1])
    draws = [sample_blocks(probabilities, 1, seed=7, window=w)[0] for w in range(10_000)]
    observed = np.bincount(draws, minlength=4)
    assert chisquare(observed, probabilities * len(draws)).pvalue > 0.01
    assert sample_blocks(probabilities, 2, seed=7, window=3) == sample_blocks(probabilities, 2, seed=7, window=3)


def test_ratios_round_trip_as_json(tmp_path):
    path = save_ratios(tmp_path / "ratios.json", [0.1, 0.2], model_name="tiny", M=5)
    assert load_ratios(path) == {"model": "tiny", "M": 5, "ratios": [0.1, 0.2]}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="missing"):
        load_ratios(tmp_path / "bad.json")


class Probe(TrainerCallback):
    """Records, at each step, which blocks are trainable and the optimizer-state bytes."""

    def __init__(self):
        self.trainable, self.state_bytes = [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.trainable.append([i for i, b in enumerate(model.model.layers) if next(b.parameters()).requires_grad])

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.state_bytes.append(optimizer_state_bytes(optimizer))


def dataset(count=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (count, 16), generator=generator)]


def training_args(tmp_path, steps=9, **extra):
    extra.setdefault("save_strategy", "no")
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             logging_steps=1, disable_tqdm=True, seed=0, **extra)


def train(tmp_path, sampling="owl", layerwise=False, steps=9, resume=None, **extra):
    model = model_with_blocks()
    ratios = compute_outlier_ratios(model, calibration(), M=3)
    args = training_args(tmp_path, steps=steps, max_grad_norm=0.0 if layerwise else 1.0, **extra)
    optimizer, callback = setup(model, args, ratios=ratios, gamma=2, interval=3, sampling=sampling, seed=1,
                                rank=4, update_proj_gap=2, layerwise=layerwise)
    probe = Probe()
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(optimizer, None),
                      callbacks=[callback, probe])
    trainer.train(resume_from_checkpoint=resume)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return model, callback, probe, losses, ratios


@pytest.mark.parametrize("sampling", ["owl", "uniform"])
def test_exactly_gamma_blocks_train_in_each_window_and_switch_on_schedule(tmp_path, sampling):
    _, callback, probe, losses, ratios = train(tmp_path, sampling)
    probabilities = block_probabilities(sampling, LAYERS, ratios)
    for step, trainable in enumerate(probe.trainable):
        assert trainable == sample_blocks(probabilities, 2, seed=1, window=step // 3), step
    assert [step for step, _ in callback.history] == [0, 3, 6]
    assert len(losses) == 9 and all(map(math.isfinite, losses))


def test_optimizer_state_never_exceeds_the_active_blocks_and_stays_flat(tmp_path):
    model, _, probe, _, _ = train(tmp_path, steps=12)
    reference = model_with_blocks()
    from hf_lowrank import create_optimizer

    full = create_optimizer(reference, "galore", rank=4, update_proj_gap=2)
    full.init_state()
    block_ids = {id(p) for p in reference.model.layers.parameters()}
    outside = sum(optimizer_state_bytes_of_param(full, p) for p in reference.parameters() if id(p) not in block_ids)
    per_block = sum(optimizer_state_bytes_of_param(full, p) for p in reference.model.layers[0].parameters())
    assert max(probe.state_bytes) <= outside + 2 * per_block
    assert max(probe.state_bytes) < optimizer_state_bytes(full)  # 2 of 4 blocks: below full-model GaLore state
    assert len(set(probe.state_bytes[1:])) == 1  # flat across resamples (the first step is before any release)


def optimizer_state_bytes_of_param(optimizer, p):
    from hf_lowrank.optim.optimizer import optimizer_state_bytes_of

    return optimizer_state_bytes_of(optimizer.state.get(p, {}))


def test_resume_reproduces_the_samples_and_the_losses(tmp_path):
    _, _, _, uninterrupted, _ = train(tmp_path / "a", steps=9)
    train(tmp_path / "b", steps=9, save_strategy="steps", save_steps=4)
    _, callback, probe, resumed, _ = train(tmp_path / "b", steps=9, resume=str(tmp_path / "b" / "checkpoint-4"))
    assert probe.trainable[0] == sample_blocks(block_probabilities("owl", LAYERS, callback.ratios), 2, 1, 4 // 3)
    assert len(resumed) == 9  # steps 0-3 come from the checkpoint's log history, 4-8 were trained again
    assert resumed[4:] == pytest.approx(uninterrupted[4:], rel=1e-6)


def test_layerwise_updates_step_blocks_activated_after_the_optimizer_was_built(tmp_path):
    before = model_with_blocks()
    model, callback, probe, losses, _ = train(tmp_path, layerwise=True)
    ever_active = {i for _, active in callback.history for i in active}
    for index in range(LAYERS):
        moved = not torch.equal(model.model.layers[index].mlp.up_proj.weight,
                                before.model.layers[index].mlp.up_proj.weight)
        assert moved == (index in ever_active), index
    assert all(math.isfinite(loss) for loss in losses)


def test_bad_input_gets_clear_errors():
    model = model_with_blocks()
    with pytest.raises(ValueError, match=r"`gamma`=5 is more than the model's 4 blocks"):
        setup(model, gamma=5, sampling="uniform")
    with pytest.raises(ValueError, match=r"`gamma` \(blocks trained at a time\) must be an int >= 1"):
        OwLoreCallback(gamma=0)
    with pytest.raises(ValueError, match=r"`interval` \(steps between resamples\) must be an int >= 1"):
        OwLoreCallback(interval=0)
    with pytest.raises(ValueError, match=r"`sampling`='lisa'"):
        OwLoreCallback(sampling="lisa")
    with pytest.raises(ValueError, match=r"`ratios` has 3 values but the model has 4 blocks"):
        setup(model, ratios=[1.0, 1.0, 1.0], gamma=2)
    with pytest.raises(ValueError, match=r"`ratios` must all be > 0"):
        setup(model, ratios=[1.0, 0.0, 1.0, 1.0], gamma=2)
    with pytest.raises(ValueError, match=r"sampling='owl' needs `ratios`"):
        setup(model, gamma=2)
    with pytest.raises(ValueError, match=r"Could not find the transformer blocks of Sequential.*blocks="):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"`blocks`='model.nothing'"):
        find_blocks(model, "model.nothing")
    with pytest.raises(ValueError, match=r"`M` \(outlier multiple\) must be a number > 0"):
        compute_outlier_ratios(model, calibration(), M=0)
    with pytest.raises(ValueError, match="`calibration_batches` is empty"):
        compute_outlier_ratios(model, [])


def test_blocks_of_other_architectures_are_found():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64, n_positions=32))
    assert find_blocks(gpt2)[0] == "transformer.h"
    ratios = compute_outlier_ratios(gpt2, calibration(), M=3)  # Conv1D weights are scored too
    assert len(ratios) == 3 and all(0 < r < 1 for r in ratios)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=64))
    assert find_blocks(bert)[0] == "encoder.layer"


def test_parts_outside_the_blocks_can_be_frozen_too(tmp_path):
    model = model_with_blocks()
    args = training_args(tmp_path, steps=2)
    optimizer, callback = setup(model, args, gamma=1, interval=1, sampling="uniform", rank=4,
                                train_outside_blocks=False)
    embedding = model.model.embed_tokens.weight.detach().clone()
    Trainer(model=model, args=args, train_dataset=dataset(8), optimizers=(optimizer, None), callbacks=[callback]).train()
    assert torch.equal(model.model.embed_tokens.weight, embedding) and not model.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="`train_outside_blocks` must be True or False"):
        OwLoreCallback(train_outside_blocks="no")
