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
    ({"nonfinite": "ignore"}, r"`nonfinite`='ignore'; use one of \['skip', 'raise'\]"),
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


def test_projected_group_rejects_sharded_parameters():
    """FSDP2 parameters are DTensors: a shard's gradient projected is not GaLore's projection of the matrix."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), init_device_mesh("cpu", (1,)), [Shard(0)]))
        with pytest.raises(ValueError, match=r"sharded parameter.*FSDP2.*DDP"):
            ProjectedOptimizer([{"params": [weight], "rank": 2}])
    finally:
        dist.destroy_process_group()


def test_galore_8bit_without_bitsandbytes_names_the_extra(model, monkeypatch):
    import hf_lowrank.utils.imports as imports

    monkeypatch.setattr(imports, "_available", lambda module: module != "bitsandbytes")
    with pytest.raises(ImportError, match=r'pip install "hf_lowrank\[bnb\]"'):
        create_optimizer(model, "galore_8bit")


def poison(model, name, value=float("nan")):
    dict(model.named_parameters())[name].grad[0, 0] = value


def test_nonfinite_gradient_is_skipped_with_one_warning():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore", rank=4, lr=1e-2)
    target = "model.layers.0.mlp.up_proj.weight"
    params = dict(model.named_parameters())
    ids = batches(1)[0]
    for attempt in range(2):
        before = {n: p.detach().clone() for n, p in params.items()}
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        poison(model, target, float("inf") if attempt else float("nan"))
        if attempt == 0:
            with pytest.warns(RuntimeWarning, match=f"Non-finite gradient in '{target}'"):
                optimizer.step()
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a second warning for the same parameter would raise here
                optimizer.step()
        assert torch.equal(params[target], before[target])  # skipped
        assert "step" not in optimizer.state[params[target]]
        assert not torch.equal(params["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


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
