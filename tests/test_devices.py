"""Device- and dtype-sensitive paths (issue: bugs only a GPU would show). Each test takes the ``device`` fixture,
so it runs on CPU here and on CUDA too when one is present (``scripts/gpu_check.sh``)."""
import pytest
import torch
from torch import nn

from hf_lowrank.optim import create_optimizer
from hf_lowrank.projectors import get_projector
from tests.conftest import make_tiny_llama


pytestmark = pytest.mark.device


def test_welore_plans_and_compresses_on_the_device(device):
    from hf_lowrank.welore import WeLoreConfig, compress

    model = make_tiny_llama().to(device)
    welore = compress(model, WeLoreConfig(rank_reduction=0.5))
    assert welore.threshold is not None and all(p.device.type == device.type for p in model.parameters())
    ids = torch.randint(0, 256, (2, 8), device=device)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_cuber_memory_stays_float32_on_the_device(device):
    from hf_lowrank.cuber.memory import RepresentationRecorder, basis_from_covariance, extend_basis

    layer = nn.Linear(16, 4).to(device)
    with RepresentationRecorder([("layer", layer)]) as recorder:
        layer(torch.randn(64, 16, device=device))
    cov = recorder.covariances["layer"]
    assert cov.dtype == torch.float32 and cov.device.type == device.type
    basis = basis_from_covariance(cov, 0.9)
    extended = extend_basis(basis[:, :1], cov, 0.99)
    assert extended.dtype == torch.float32 and extended.shape[1] >= 1


def test_merge_and_unload_keeps_frozen_parameters_frozen(device):
    from hf_lowrank.welore import WeLoreConfig, compress

    model = make_tiny_llama().to(device)
    model.model.embed_tokens.weight.requires_grad_(False)  # the user's choice before the tuner
    merged = compress(model, WeLoreConfig(rank_reduction=0.5)).merge_and_unload()
    assert not merged.model.embed_tokens.weight.requires_grad
    assert merged.model.layers[0].mlp.up_proj.weight.requires_grad


def test_random_projector_draws_on_the_gradient_device_and_resumes_there(device):
    """The Gaussian is drawn by the device's own generator (no host draw or copy); a resumed projector, its state
    mapped to the CPU and back as a checkpoint would be, redraws the same basis, and so do later refreshes."""
    from hf_lowrank.projectors.random import GENERATOR_DEVICE_TYPES

    grad = torch.randn(32, 48, device=device)
    projector = get_projector("random", grad.shape, 4, seed=5)
    projector.update(grad)
    saved = {k: v.cpu() for k, v in projector.state_dict().items()}
    assert GENERATOR_DEVICE_TYPES[int(saved["generator_device"])] == device.type
    assert projector.basis().device.type == device.type
    first = projector.basis().clone()
    resumed = get_projector("random", grad.shape, 4, seed=5)
    resumed.load_state_dict({k: v.to(device) for k, v in saved.items()})
    assert torch.equal(resumed.basis(), first)
    projector.update(grad)
    resumed.update(grad)
    assert torch.equal(resumed.basis(), projector.basis())
    if device.type != "cpu":  # state left on the CPU: the recorded device's generator draws, the CPU's QR runs
        on_cpu = get_projector("random", grad.shape, 4, seed=5)
        on_cpu.load_state_dict(saved)
        q = on_cpu.basis()
        assert q.device.type == "cpu"
        torch.testing.assert_close(q @ q.T, (first @ first.T).cpu(), rtol=0, atol=1e-5)  # QR signs may differ


def test_quantized_randomized_projector_keeps_and_saves_its_sketch_counter(device):
    shape, grad = (32, 48), torch.randn(32, 48, device=device)
    projector = get_projector("randomized", shape, 4, quant_bits=4, quant_group_size=32)
    projector.update(grad)
    saved = {k: v.clone() for k, v in projector.state_dict().items()}
    assert int(saved["refreshes"]) == 1
    projector.update(grad)  # second refresh: a new sketch (counter 1), not the first one again
    resumed = get_projector("randomized", shape, 4, quant_bits=4, quant_group_size=32)
    resumed.load_state_dict(saved)
    resumed.update(grad)
    assert int(projector.state_dict()["refreshes"]) == 2
    assert torch.equal(resumed.basis(), projector.basis())


@pytest.mark.parametrize("mode", ["galore", "galore_8bit", "q_galore"])
def test_an_optimizer_step_stays_on_the_device(device, mode):
    from tests.conftest import prepare_for_mode

    model = prepare_for_mode(make_tiny_llama().to(device), mode)
    optimizer = create_optimizer(model, mode, rank=8, update_proj_gap=2, lr=1e-2, min_8bit_size=256)
    ids = torch.randint(0, 256, (2, 8), device=device)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tensors = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert all(t.device.type == device.type for t in tensors)
    assert all(t.dtype != torch.float64 for t in tensors)


def test_tpsgd_projection_is_cached_on_the_device(device):
    from hf_lowrank.tpsgd import TpSGDModel

    model = TpSGDModel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10)))
    like = torch.zeros(1, device=device)
    first = model.projection(0, 16, like)
    assert first.device.type == device.type and model.projection(0, 16, like) is first  # no copy per call
    torch.testing.assert_close(first.cpu(), model.projection(0, 16, torch.zeros(1)))  # the same P on every device
