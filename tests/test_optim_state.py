"""Checkpoints: tensor-only state, weights_only reload, exact resume for every mode, device/dtype remap, sizes."""
import io
import math

import pytest
import torch

from hf_lowrank.optim import available_modes, create_optimizer, optimizer_state_bytes
from tests.conftest import make_tiny_llama, prepare_for_mode
from tests.test_optim_modes import batches, mode_kwargs, train


GAP = 3


def make(mode, model=None, **options):
    model = model or prepare_for_mode(make_tiny_llama(), mode)
    kwargs = {**mode_kwargs(mode), "update_proj_gap": GAP, **options}
    return model, create_optimizer(model, mode, **kwargs)


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_plain_data(value, where="state"):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), where
            assert_plain_data(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for v in value:
            assert_plain_data(v, where)
    else:
        assert value is None or isinstance(value, (torch.Tensor, int, float, str, bool)), f"{where}: {type(value)}"


OPTION_VARIANTS = [
    ("galore", {"moment_policy": "rotate", "sign_convention": "align"}),
    ("galore", {"quant_bits": 4, "quant_group_size": 64}),  # INT4-stored projector (Q-GaLore)
    ("galore_dct", {"moment_policy": "rotate"}),
    ("frugal", {"residual": "sgd", "projector": "randomized"}),
]


@pytest.mark.parametrize("stop", [GAP, GAP + 1])  # right before a refresh, and mid-period
@pytest.mark.parametrize("mode, options", [(m, {}) for m in available_modes()] + OPTION_VARIANTS)
def test_resume_reproduces_uninterrupted_run(mode, options, stop):
    data = batches(2 * GAP + 1, seed=1)
    model, optimizer = make(mode, **options)
    train(model, optimizer, data)

    first, first_opt = make(mode, **options)
    train(first, first_opt, data[:stop])
    saved_model, saved_opt = roundtrip(first.state_dict()), roundtrip(first_opt.state_dict())
    assert_plain_data(saved_opt)
    resumed = prepare_for_mode(make_tiny_llama(seed=123), mode)  # different init: all from the checkpoint
    resumed.load_state_dict(saved_model)
    _, resumed_opt = make(mode, resumed, **options)
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, resumed_opt, data[stop:])
    expected, got = model.state_dict(), resumed.state_dict()  # buffers too: quantized weights are buffers
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        torch.testing.assert_close(value, got[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["galore", "galore_8bit", "galore_dct", "galore_random"])
def test_load_onto_meta_device_keeps_dtypes(mode):
    model, optimizer = make(mode)
    train(model, optimizer, batches(1))
    saved = roundtrip(optimizer.state_dict())
    _, meta_opt = make(mode, make_tiny_llama().to("meta"))
    meta_opt.load_state_dict(saved)
    source = {name: optimizer.state[p] for g in optimizer.param_groups for name, p in zip(g["param_names"], g["params"])}
    for group in meta_opt.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            loaded, original = meta_opt.state[p], source[name]
            assert loaded.keys() == original.keys()
            for key, value in loaded.items():
                if isinstance(value, torch.Tensor):
                    assert value.device.type == "meta" and value.dtype == original[key].dtype, (name, key)
                    assert value.shape == original[key].shape


def test_load_into_bf16_model_keeps_state_dtype_and_steps():
    model, optimizer = make("galore")
    train(model, optimizer, batches(1))
    saved = roundtrip(optimizer.state_dict())
    bf16 = make_tiny_llama().to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    _, bf16_opt = make("galore", bf16)
    bf16_opt.load_state_dict(saved)
    group = bf16_opt.param_groups[-1]
    state = bf16_opt.state[group["params"][0]]
    assert state["exp_avg"].dtype == torch.float32 and state["projector"]["basis"].dtype == torch.float32
    train(bf16, bf16_opt, batches(1, seed=5))
    assert all(torch.isfinite(p).all() for p in bf16.parameters())


def low_rank_shape(shape, rank):
    m, n = shape
    return (m, rank) if m >= n else (rank, n)  # std: project the smaller side


def test_state_bytes_match_hand_count():
    rank = 8
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore", rank=rank)
    train(model, optimizer, batches(1))
    projected = {id(p) for p in optimizer.param_groups[-1]["params"]}
    expected = 0
    for p in model.parameters():
        if id(p) in projected:
            low = low_rank_shape(p.shape, rank)
            basis = min(p.shape) * rank  # the projected side's dimension x rank, fp32
            expected += 2 * math.prod(low) * 4 + basis * 4
        else:
            expected += 2 * p.numel() * 4
    assert optimizer_state_bytes(optimizer) == expected

    model_8 = make_tiny_llama()
    opt_8 = create_optimizer(model_8, "galore_8bit", rank=rank, min_8bit_size=4096)
    train(model_8, opt_8, batches(1))
    projected_8 = {id(p) for p in opt_8.param_groups[-1]["params"]}
    expected_8 = 0
    for p in model_8.parameters():
        numel = math.prod(low_rank_shape(p.shape, rank)) if id(p) in projected_8 else p.numel()
        if numel >= 4096:
            expected_8 += 2 * (numel + 4 * math.ceil(numel / 256))  # uint8 codes + fp32 absmax per 256 block
        else:
            expected_8 += 2 * numel * 4
        if id(p) in projected_8:
            expected_8 += min(p.shape) * rank * 4
    assert optimizer_state_bytes(opt_8) == expected_8


@pytest.mark.parametrize("mode", ["adamw", "galore", "galore_8bit", "galore_dct", "galore_adafactor", "frugal"])
def test_init_state_on_meta_matches_real_state(mode):
    """Sizing without memory: init_state() on a meta model gives the bytes a real run holds after one step."""
    real, real_opt = make(mode)
    train(real, real_opt, batches(1))
    _, meta_opt = make(mode, make_tiny_llama().to("meta"))
    meta_opt.init_state()
    assert optimizer_state_bytes(meta_opt) == optimizer_state_bytes(real_opt)
    assert all(t.device.type == "meta" for s in meta_opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def test_trainer_builds_it_from_optimizer_cls_and_kwargs(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_lowrank.optim import ProjectedOptimizer, optimizer_cls_and_kwargs

    model = make_tiny_llama()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    cls_and_kwargs = optimizer_cls_and_kwargs(model, "galore", rank=4, update_proj_gap=2, lr=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizer_cls_and_kwargs=cls_and_kwargs)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, ProjectedOptimizer)  # accelerate wraps it
    assert next(g for g in trainer.optimizer.param_groups if "rank" in g)["rank"] == 4
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(map(math.isfinite, losses))


def test_the_factory_protocol_builds_layerwise_optimizers_in_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_lowrank import LayerwiseGradNormCallback, NonFiniteLogCallback, optimizer_factory
    from hf_lowrank.optim import OptimizerFactory, optimizer_cls_and_kwargs
    from hf_lowrank.optim.layerwise import LayerwiseOptimizer

    model = make_tiny_llama()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                             max_grad_norm=0.0)
    factory = optimizer_factory("galore", rank=4, update_proj_gap=2, layerwise=True)
    assert factory[0] is OptimizerFactory and "params" not in factory[1]  # no parameter references up front
    assert optimizer_cls_and_kwargs(model, "galore", rank=4, layerwise=True)[0] is OptimizerFactory
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizer_cls_and_kwargs=factory,
                      callbacks=[LayerwiseGradNormCallback(), NonFiniteLogCallback()])
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, LayerwiseOptimizer)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(log["grad_norm"] > 0 and log["skipped_steps"] == 0 for log in logs)
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['rnak'\]"):
        optimizer_factory("galore", rnak=4)  # names are checked before Trainer builds it


def test_a_projected_parameter_flattened_after_construction_gets_a_clear_error():
    """DeepSpeed ZeRO / FSDP1 replace each group's parameters by one flat 1-D buffer."""
    from hf_lowrank import create_optimizer

    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore", rank=4)
    group = next(g for g in optimizer.param_groups if "rank" in g)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in group["params"]]))
    flat.grad = torch.zeros_like(flat)
    group["params"] = [flat]
    with pytest.raises(ValueError, match=r"a wrapper replaced them: DeepSpeed ZeRO-1/2.*attach_zero"):
        optimizer.step()


@pytest.mark.parametrize("mode", ["adamw", "galore", "galore_subspace", "frugal"])
def test_steps_run_on_fake_tensors_for_memory_estimation(mode):
    """Under FakeTensorMode (no data, e.g. torch's MemTracker estimating a training step) a step, refresh included,
    runs: non-finite checks and refreshes read no values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = make_tiny_llama()
        optimizer = create_optimizer(model, mode, **{**mode_kwargs(mode), "update_proj_gap": 1})
        ids = torch.randint(0, 256, (2, 8))
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert optimizer_state_bytes(optimizer) > 0
