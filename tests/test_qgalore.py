"""Q-GaLore: the group codec, stochastic rounding, packed projectors, the lazy refresh rule, INT8 training against
the fake-quant reference, save / load / dense export, layer-wise, and clear errors."""
import math

import pytest
import torch
from torch import nn

from hf_lowrank.callbacks import RefreshLogCallback
from hf_lowrank.optim import create_optimizer, optimizer_factory
from hf_lowrank.optim import refresh as refresh_policy
from hf_lowrank.projectors import get_projector
from hf_lowrank.qgalore import (QGaLoreConfig, QuantLinear, export_dense, load_qgalore, prepare_model_for_qgalore,
                                quantized_layers, save_qgalore)
from hf_lowrank.utils.quantization import dequantize_groups, packed_bytes, quantize_groups
from tests.conftest import make_tiny_llama
from tests.test_optim_modes import batches, train


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OPTIONS = {"rank": 8, "update_proj_gap": 4, "lr": 1e-2, "min_8bit_size": 256}


def prepared(simulate=False, seed=0, **options):
    return prepare_model_for_qgalore(make_tiny_llama(seed=seed), group_size=64, simulate=simulate, **options)


# --- the codec ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_to_nearest_error_is_at_most_half_a_level_per_group(device, bits):
    x = torch.randn(64, 256, device=device) * torch.logspace(-2, 1, 64, device=device)[:, None]  # groups of varied range
    codes, scale, minimum = quantize_groups(x, bits, 128)
    back = dequantize_groups(codes, scale, minimum, bits, 128, x.shape)
    error = (back - x).abs().view(-1, 128).max(1).values
    assert torch.all(error <= scale / 2 * (1 + 1e-4) + 1e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_round_trip_and_exact_byte_count(bits):
    numel, group = 1000, 64  # 1000 is not a multiple of the group: the last group is padded
    x = torch.randn(numel)
    codes, scale, minimum = quantize_groups(x, bits, group)
    assert codes.dtype == torch.uint8
    assert codes.numel() == packed_bytes(numel, bits, group) == math.ceil(16 * group / (8 // bits))
    levels = dequantize_groups(codes, scale, minimum, bits, group, x.shape)
    again = quantize_groups(levels, bits, group)  # values on the grid re-encode to the same codes
    assert torch.equal(again[0], codes)


def test_stochastic_rounding_is_unbiased():
    """Mean of 4000 stochastic roundings vs the value: within 5 standard errors (the per-draw error of SR is at
    most one level, so its standard deviation is at most scale / 2)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    generator = torch.Generator().manual_seed(1234)
    draws = 4000
    total = torch.zeros_like(x)
    for _ in range(draws):
        codes, scale, minimum = quantize_groups(x, 8, 64, generator=generator, stochastic=True)
        total += dequantize_groups(codes, scale, minimum, 8, 64, x.shape)
    _, scale, _ = quantize_groups(x, 8, 64)
    bound = 5 * (scale[:, None] / 2) / math.sqrt(draws)
    assert torch.all((total / draws - x).abs() <= bound.expand_as(x).reshape(x.shape))
    codes, scale, minimum = quantize_groups(x, 8, 64)  # round-to-nearest is biased for a value between levels
    nearest = dequantize_groups(codes, scale, minimum, 8, 64, x.shape)
    assert (nearest - x).abs().max() > bound.max()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_projector_storage_packs_every_width(bits):
    shape, rank = (256, 512), 32
    dense = get_projector("svd", shape, rank)
    quant = get_projector("svd", shape, rank, quant_bits=bits, quant_group_size=256)
    g = torch.randn(shape)
    dense.update(g)
    quant.update(g)
    assert quant.state_dict()["codes"].numel() == 256 * rank * bits // 8
    codes_bytes = quant.state_dict()["codes"].numel()
    assert codes_bytes * 32 // bits == dense.state_bytes()  # 8 // bits codes per byte, exactly
    if bits == 4:
        assert quant.state_bytes() <= dense.state_bytes() / 7.5  # codes + fp32 scale/offset per 256 values


# --- the lazy refresh rule ----------------------------------------------------------------------------
def lazy_group(**options):
    return {"update_proj_gap": 10, **refresh_policy.REFRESH_DEFAULTS, "refresh": "lazy", **options}


def run_rule(cosines, group):
    """Feed the rule refreshes whose leading directions have the given |cosine| to the previous one."""
    state, step, gaps = {}, 0, []
    previous = None
    for cosine in [None] + list(cosines):
        current = torch.tensor([1.0, 0.0]) if cosine is None else torch.tensor([cosine, math.sqrt(1 - cosine**2)])
        prev = None if previous is None else torch.tensor([1.0, 0.0])
        refresh_policy.record([state], [step], [prev], [current], group)
        gaps.append(state["refresh_gap"])
        step = state["next_refresh"]
        previous = current
    return state, gaps


def test_lazy_gap_doubles_once_the_queue_is_full_and_agrees():
    state, gaps = run_rule([0.9] * 7, lazy_group())
    # the first refresh has nothing to compare; 5 cosines fill the queue, then every refresh doubles (never cleared)
    assert gaps == [10, 10, 10, 10, 10, 20, 40, 80]
    assert len(state["cos_queue"]) == 5


def test_lazy_gap_with_queue_reset_needs_a_fresh_queue_each_time():
    _, gaps = run_rule([0.9] * 10, lazy_group(queue_reset=True))
    assert gaps == [10, 10, 10, 10, 10, 20, 20, 20, 20, 20, 40]


def test_lazy_gap_stays_while_the_subspace_moves():
    _, gaps = run_rule([0.1, 0.9, 0.1, 0.2, 0.3, 0.2, 0.1], lazy_group())
    assert set(gaps) == {10}


def test_fixed_policy_and_report():
    group = {"update_proj_gap": 10, **refresh_policy.REFRESH_DEFAULTS}
    assert [s for s in range(35) if refresh_policy.is_due({}, s, group)] == [0, 10, 20, 30]
    report = refresh_policy.report({"refreshes": 2, "refresh_gap": 20}, 31, group)
    assert report == {"refreshes": 2, "scheduled": 4, "skipped": 2, "gap": 20}


def test_lazy_policy_skips_svds_on_a_stable_gradient_and_resumes_exactly():
    """A fixed low-rank target keeps the subspace still: the lazy optimizer skips refreshes, and its state (gap,
    queue, counts) resumes the run exactly."""
    torch.manual_seed(0)
    target = torch.randn(32, 4) @ torch.randn(4, 48)

    def make():
        torch.manual_seed(1)
        model = nn.Linear(48, 32, bias=False)
        return model, create_optimizer(model, "galore", rank=4, update_proj_gap=2, lr=1e-2, refresh="lazy",
                                       queue_size=2, cos_threshold=0.5)

    def run(model, optimizer, steps):
        for _ in range(steps):
            ((model.weight - target) ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    model, optimizer = make()
    run(model, optimizer, 40)
    report = next(iter(optimizer.refresh_report().values()))
    assert report["scheduled"] == 20 and report["skipped"] >= 10 and report["gap"] > 2
    first, first_opt = make()
    run(first, first_opt, 17)
    second, second_opt = make()
    second.load_state_dict(first.state_dict())
    second_opt.load_state_dict(first_opt.state_dict())
    run(second, second_opt, 23)
    assert torch.equal(second.weight, model.weight)
    assert second_opt.refresh_report() == optimizer.refresh_report()


# --- INT8 weights ----------------------------------------------------------------------------------------
def test_prepare_replaces_only_the_targets_and_keeps_memory_low():
    model = prepared()
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7 and all(n.split(".")[-2] in ("self_attn", "mlp") for n in layers)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    layer = layers["model.layers.0.mlp.down_proj"]
    assert layer.codes.dtype == torch.uint8 and layer.codes.numel() == 64 * 128
    assert layer.weight.shape == (64, 128) and layer.weight.requires_grad
    storages = {m.weight.untyped_storage().data_ptr() for m in layers.values()}
    assert len(storages) == 1  # every gradient carrier views one workspace (the largest targeted matrix)
    model.to(torch.bfloat16)
    assert len({m.weight.untyped_storage().data_ptr() for m in layers.values()}) == 1
    assert layer.weight.dtype == torch.bfloat16 and layer.scale.dtype == torch.float32


def test_gradient_reaches_the_carrier_as_a_float_gradient():
    model, reference = prepared(), prepared(simulate=True)
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    layer = model.model.layers[1].self_attn.q_proj
    assert layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, reference.model.layers[1].self_attn.q_proj.weight.grad)


def test_int8_training_falls_and_tracks_the_fake_quant_reference():
    model, reference = prepared(), prepared(simulate=True)
    data = batches(2) * 6
    losses = train(model, create_optimizer(model, "q_galore", **OPTIONS), data)
    reference_losses = train(reference, create_optimizer(reference, "q_galore", **OPTIONS), data)
    assert losses[-1] < 0.85 * losses[0]
    assert losses == pytest.approx(reference_losses, rel=1e-4)
    layer, fake = model.model.layers[0].mlp.up_proj, reference.model.layers[0].mlp.up_proj
    torch.testing.assert_close(layer.dequantized_weight(), fake.weight, rtol=0, atol=1e-3)


def test_stochastic_rounding_keeps_small_updates_that_nearest_rounding_loses():
    """With a learning rate far below one quantization level, round-to-nearest never moves the weight."""
    data = batches(1) * 4
    options = {**OPTIONS, "lr": 1e-5}
    moved = {}
    for stochastic in (True, False):
        model = prepared(stochastic_rounding=stochastic)
        before = model.model.layers[0].mlp.up_proj.codes.clone()
        train(model, create_optimizer(model, "q_galore", **options), data)
        moved[stochastic] = (model.model.layers[0].mlp.up_proj.codes != before).float().mean().item()
    assert moved[False] == 0.0 < moved[True]


def test_layerwise_q_galore_equals_the_normal_step():
    data = batches(3)
    model, layerwise_model = prepared(), prepared()
    train(model, create_optimizer(model, "q_galore", **OPTIONS), data)
    optimizer = create_optimizer(layerwise_model, "q_galore", layerwise=True, **OPTIONS)
    train(layerwise_model, optimizer, data)
    optimizer.remove_hooks()
    for (name, value), other in zip(model.state_dict().items(), layerwise_model.state_dict().values()):
        assert torch.equal(value, other), name


def test_a_skipped_step_leaves_the_codes_unchanged():
    model = prepared()
    optimizer = create_optimizer(model, "q_galore", **OPTIONS)
    train(model, optimizer, batches(1))
    ids = batches(1, seed=1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    model.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.nonfinite_report() == {"skipped_steps": 1}


# --- checkpoints ----------------------------------------------------------------------------------------------
def test_save_load_gives_identical_logits_and_dense_export_loads_with_from_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    model = prepared()
    train(model, create_optimizer(model, "q_galore", **OPTIONS), batches(2))
    ids = batches(1, seed=3)[0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_qgalore(model, tmp_path / "int8")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "int8" / "model.safetensors")
    assert saved["model.layers.0.mlp.up_proj.codes"].dtype == torch.uint8
    assert "model.layers.0.mlp.up_proj.weight" not in saved
    reloaded = load_qgalore(tmp_path / "int8")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
    export_dense(model, tmp_path / "dense")
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "dense")
    assert isinstance(dense.model.layers[0].mlp.up_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_trainer_factory_protocol_trains_a_prepared_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = prepared()
    examples = [{"input_ids": row, "labels": row} for batch in batches(4) for row in batch]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, use_cpu=True,
                             report_to=[], logging_steps=1, save_strategy="no", learning_rate=1e-2, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=[RefreshLogCallback()],
                      optimizer_cls_and_kwargs=optimizer_factory("q_galore", **{k: v for k, v in OPTIONS.items()
                                                                                 if k != "lr"}))
    before = model.model.layers[0].mlp.up_proj.codes.clone()
    trainer.train()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.codes)
    logged = [e for e in trainer.state.log_history if "refreshes" in e]
    assert logged[-1]["refreshes"] == 14 and logged[-1]["refreshes_skipped"] == 0  # 14 matrices (all-linear: no head)


# --- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"group_size": 48}, "`group_size`=48 does not divide the input dimension 64"),
    ({"weight_bits": 3}, "`weight_bits`=3 is not supported"),
    ({"target_modules": ["norm"]}, "matches .*RMSNorm.* but no Linear"),
    ({"target_modules": ["model.embed_tokens"]}, "Embedding"),
    ({"group_size": 0}, "`group_size` must be a positive int"),
])
def test_bad_preparation_is_a_clear_error(options, match):
    with pytest.raises(ValueError, match=match):
        prepare_model_for_qgalore(make_tiny_llama(), **{"group_size": 64, **options})


def test_q_galore_on_an_unprepared_model_is_a_clear_error():
    with pytest.raises(ValueError, match="prepare_model_for_qgalore"):
        create_optimizer(make_tiny_llama(), "q_galore", **OPTIONS)


def test_bad_refresh_options_are_clear_errors():
    for options, match in (({"refresh": "sometimes"}, "`refresh`="), ({"cos_threshold": 2}, "`cos_threshold`"),
                           ({"gamma_proj": 0.5}, "`gamma_proj`"), ({"queue_size": 0}, "`queue_size`")):
        with pytest.raises(ValueError, match=match):
            create_optimizer(make_tiny_llama(), "galore", **options)


def test_a_dense_weight_into_a_quantized_model_is_a_clear_error():
    model = prepared()
    with pytest.raises(RuntimeError, match="dense weight was given to a QuantLinear"):
        model.load_state_dict(make_tiny_llama().state_dict(), strict=False)


def test_config_round_trips():
    config = QGaLoreConfig(target_modules=["q_proj"], group_size=128)
    assert QGaLoreConfig(**config.to_dict()) == config


def test_deepcopy_keeps_the_weights_and_shares_a_new_workspace():
    import copy

    model = prepared()
    copied = copy.deepcopy(model)
    ids = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, copied(input_ids=ids).logits)
    ptrs = {m.weight.untyped_storage().data_ptr() for m in quantized_layers(copied).values()}
    assert len(ptrs) == 1 and not ptrs & {m.weight.untyped_storage().data_ptr() for m in quantized_layers(model).values()}
    optimizer = create_optimizer(copied, "q_galore", **OPTIONS)  # the copy trains through its own sinks
    before = copied.model.layers[0].mlp.up_proj.codes.clone()
    train(copied, optimizer, batches(1))
    assert not torch.equal(before, copied.model.layers[0].mlp.up_proj.codes)
    assert torch.equal(before, model.model.layers[0].mlp.up_proj.codes)


def test_four_bit_weights_pack_two_codes_a_byte_and_train():
    model = prepared(weight_bits=4)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.codes.numel() == 64 * 128 // 2
    dense = make_tiny_llama()
    error = (layer.dequantized_weight() - dense.model.layers[0].mlp.down_proj.weight).abs()
    assert error.max() <= (layer.scale.max() / 2) * 1.001
    codes = layer.codes.clone()
    train(model, create_optimizer(model, "q_galore", **OPTIONS), batches(2))
    assert not torch.equal(codes, layer.codes)
