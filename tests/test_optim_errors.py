"""Bad input gets an early, clear error naming the parameter and the fix; bad numbers never crash a run."""
import logging

import pytest
import torch

from hf_lowrank.optim import ProjectedOptimizer, create_optimizer
from tests.conftest import make_tiny_llama
from tests.test_optim_modes import batches, train


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


def test_unknown_mode_lists_valid_ones(model):
    with pytest.raises(ValueError, match=r"Unknown optimizer mode 'galor'.*galore, galore_8bit"):
        create_optimizer(model, "galor")


def test_target_modules_matching_nothing(model):
    with pytest.raises(ValueError, match=r"`target_modules`='nothing_here' matched no Linear.*q_proj"):
        create_optimizer(model, "galore", target_modules="nothing_here")


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "`rank` must be an int >= 1"),
    ({"rank": 2.5}, "`rank` must be an int >= 1"),
    ({"rank": True}, "`rank` must be an int >= 1"),
    ({"update_proj_gap": 0}, "`update_proj_gap` must be an int >= 1"),
    ({"scale": 0}, r"`scale` must be > 0"),
    ({"scale": -1.0}, r"`scale` must be > 0"),
    ({"proj_type": "full"}, r"`proj_type`='full' is not supported; use one of \['std', 'reverse_std', 'left', 'right'\]"),
    ({"moment_policy": "rotatee"}, r"`moment_policy`='rotatee'; use one of \['keep', 'reset', 'rotate'\]"),
    ({"residual": "sign"}, r"`residual`='sign'; use one of \['none', 'signsgd', 'sgd'\]"),
    ({"rnak": 8}, r"Unknown option\(s\) \['rnak'\] for mode 'galore'"),
    ({"sign_convention": "up"}, r"`sign_convention`='up'"),
    ({"nonfinite": "ignore"}, r"`nonfinite`='ignore'; use one of \['skip_step', 'skip_param', 'raise'\]"),
    ({"distributed": "on"}, r"`distributed`='on'; use one of \['auto', 'off'\]"),
    ({"lr": -1.0}, r"`lr` must be >= 0"),
    ({"betas": (0.9, 1.0)}, r"`betas` must be two numbers in \[0, 1\)"),
    ({"density": 0.3, "rank": None, "projector": "svd"}, None),  # valid: rank follows density
])
def test_invalid_options(model, kwargs, message):
    if message is None:
        create_optimizer(model, "galore", **kwargs)
        return
    with pytest.raises((ValueError, TypeError), match=message):
        create_optimizer(model, "galore", **kwargs)


def test_rotate_needs_an_inner_that_can_rotate(model):
    with pytest.raises(ValueError, match=r"`moment_policy`='rotate' is not supported by inner 'adafactor'"):
        create_optimizer(model, "galore_adafactor", moment_policy="rotate")


def test_both_frugal_lr_scale_names_is_an_error(model):
    with pytest.raises(ValueError, match="inactive_lr_scale"):
        create_optimizer(model, "frugal", residual_lr_scale=1.0, inactive_lr_scale=0.1)
    optimizer = create_optimizer(model, "frugal", inactive_lr_scale=0.1)
    assert optimizer.param_groups[-1]["residual_lr_scale"] == 0.1


def test_projected_group_rejects_non_matrices():
    with pytest.raises(ValueError, match=r"shape \(4,\); only 2-D weights can be projected"):
        ProjectedOptimizer([{"params": [torch.nn.Parameter(torch.zeros(4))], "rank": 2}])


def test_unsupported_dtensor_layouts_and_inners_are_refused_at_the_first_step():
    """FSDP2's Shard(0) on a 1-D mesh is supported; other layouts and block-wise / factored inners say so."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        cases = [([Replicate()], "adamw", r"sharded on dim 0 over a 1-D mesh.*HSDP / tensor parallel"),
                 ([Shard(1)], "adamw", r"sharded on dim 0 over a 1-D mesh"),
                 ([Shard(0)], "adafactor", r"inner='adafactor' is not supported on FSDP2-sharded parameters"),
                 ([Shard(0)], "adamw8bit", r"inner='adamw8bit' is not supported on FSDP2-sharded parameters")]
        for placements, inner, message in cases:
            weight = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, placements))
            weight.grad = distribute_tensor(torch.randn(8, 4), mesh, placements)
            optimizer = ProjectedOptimizer([{"params": [weight], "rank": 2}], inner=inner)
            with pytest.raises(ValueError, match=message):
                optimizer.step()
    finally:
        dist.destroy_process_group()


def test_galore_8bit_without_bitsandbytes_names_the_extra(model, monkeypatch):
    import hf_lowrank.utils.imports as imports

    monkeypatch.setattr(imports, "_available", lambda module: module != "bitsandbytes")
    with pytest.raises(ImportError, match=r'pip install "hf_lowrank\[bnb\]"'):
        create_optimizer(model, "galore_8bit")


def test_8bit_block_size_other_than_the_fused_kernels_is_refused(model):
    with pytest.raises(ValueError, match=r"`block_size`=128.*pass block_size=256"):
        create_optimizer(model, "galore_8bit", block_size=128)


def poison(model, name, value=float("nan")):
    dict(model.named_parameters())[name].grad[0, 0] = value


def snapshot(model, optimizer):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items() if k != "projector"}
             for p, st in optimizer.state.items()}
    return params, state


@pytest.mark.parametrize("mode", ["galore", "adamw", "galore_8bit", "galore_adafactor", "frugal"])
def test_a_nonfinite_gradient_skips_the_whole_step_by_default(mode):
    model = make_tiny_llama()
    optimizer = create_optimizer(model, mode, rank=4, update_proj_gap=5, lr=1e-2, weight_decay=0.1,
                                 min_8bit_size=16)
    target = "model.layers.0.mlp.up_proj.weight"
    data = batches(3)
    train(model, optimizer, data[:1])  # state exists
    params_before, state_before = snapshot(model, optimizer)
    optimizer.zero_grad()
    model(input_ids=data[1], labels=data[1]).loss.backward()
    poison(model, target)
    optimizer.step()
    params_after, state_after = snapshot(model, optimizer)
    for name, value in params_before.items():
        assert torch.equal(params_after[name], value), name  # every parameter, not only the poisoned one
    for key, entry in state_before.items():
        for k, v in entry.items():
            if torch.is_tensor(v):
                assert torch.equal(state_after[key][k], v), k
    assert optimizer.nonfinite_report() == {"skipped_steps": 1}
    train(model, optimizer, data[2:])  # the next finite step updates again
    assert not torch.equal(dict(model.named_parameters())[target], params_before[target])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_param_skips_only_the_nonfinite_parameter():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore", rank=4, lr=1e-2, nonfinite="skip_param")
    target = "model.layers.0.mlp.up_proj.weight"
    params = dict(model.named_parameters())
    ids = batches(1)[0]
    for attempt in range(2):
        before = {n: p.detach().clone() for n, p in params.items()}
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        poison(model, target, float("inf") if attempt else float("nan"))
        optimizer.step()
        assert torch.equal(params[target], before[target])  # skipped
        assert not torch.equal(params["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    assert optimizer.nonfinite_report() == {"skipped_params": {repr(target): 2}}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_refresh_waits_for_a_finite_gradient():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore", rank=4, update_proj_gap=2, lr=1e-2)
    target = "model.layers.0.mlp.up_proj.weight"
    p = dict(model.named_parameters())[target]
    data = batches(4)
    train(model, optimizer, data[:2])  # refresh at step 0; step 2 is the next refresh
    basis = optimizer._projectors[p].basis().clone()
    optimizer.zero_grad()
    model(input_ids=data[2], labels=data[2]).loss.backward()
    poison(model, target)
    optimizer.step()
    assert torch.equal(optimizer._projectors[p].basis(), basis) and optimizer.state[p]["step"] == 2
    train(model, optimizer, data[3:])  # refreshes now, from a finite gradient
    assert not torch.equal(optimizer._projectors[p].basis(), basis) and optimizer.state[p]["step"] == 3


def test_nonfinite_gradient_can_raise():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore", rank=4, nonfinite="raise")
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    poison(model, "lm_head.weight")
    with pytest.raises(FloatingPointError, match="'lm_head.weight'"):
        optimizer.step()


def failing_full_svd(real_svd):
    """torch.linalg.svd that fails on full-size gradients (>= 32 rows/cols) but works on small sketches."""
    def svd(matrix, *args, **kwargs):
        if min(matrix.shape) >= 32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (simulated).")
        return real_svd(matrix, *args, **kwargs)
    return svd


def test_svd_failure_falls_back_to_randomized_then_previous(monkeypatch, caplog):
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore", rank=4, update_proj_gap=2, lr=1e-2)
    monkeypatch.setattr(torch.linalg, "svd", failing_full_svd(torch.linalg.svd))
    data = batches(1) * 3
    with caplog.at_level(logging.WARNING):
        losses = train(model, optimizer, data[:1])  # first refresh: no previous basis -> randomized SVD
    assert "no previous projector; using randomized SVD" in caplog.text
    group = optimizer.param_groups[-1]
    p = group["params"][0]
    basis = optimizer._projectors[p].basis().clone()
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        losses += train(model, optimizer, data[1:])  # step 2 refreshes: the previous basis is kept
    assert "keeping the previous projector" in caplog.text
    assert torch.equal(optimizer._projectors[p].basis(), basis)
    assert losses[-1] < losses[0]
