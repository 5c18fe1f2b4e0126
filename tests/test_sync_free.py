"""The optimizer step never waits for the device outside refreshes: no ``.item()``, ``.tolist()``, ``.cpu()``,
``bool(tensor)``, ``.nonzero()`` (the host reads a device value) in ``step()`` or in the layer-wise hooks, counted
by :class:`hf_lowrank.optim.syncs.HostSyncCounter` (patched methods and ``aten._local_scalar_dense`` / ``nonzero``
dispatches).
"""
import pytest
import torch

from hf_lowrank.optim import available_modes, create_optimizer
from hf_lowrank.optim.syncs import HostSyncCounter
from tests.conftest import make_tiny_llama, prepare_for_mode


def one_step(mode, layerwise, gap, device="cpu", tied=False):
    model = prepare_for_mode(make_tiny_llama(tie_word_embeddings=tied).to(device), mode)
    optimizer = create_optimizer(model, mode, rank=8, update_proj_gap=gap, lr=1e-3, min_8bit_size=256,
                                 layerwise=layerwise)
    ids = torch.randint(0, 256, (2, 8), device=device)
    model(input_ids=ids, labels=ids).loss.backward()  # the first step refreshes every projector
    optimizer.step()
    optimizer.zero_grad()
    with HostSyncCounter() as counter:
        model(input_ids=ids, labels=ids).loss.backward()  # layer-wise: the updates run in here
        optimizer.step()
    if layerwise:
        optimizer.remove_hooks()
    return counter.counts


@pytest.mark.device
@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("mode", available_modes())
def test_a_step_without_refresh_never_reads_the_device_from_the_host(device, mode, layerwise):
    assert one_step(mode, layerwise, gap=100, device=device) == {}


@pytest.mark.device
@pytest.mark.parametrize("mode", ["galore", "galore_8bit"])
def test_the_in_place_lookup_rows_of_a_tied_embedding_add_no_sync(device, mode):
    assert one_step(mode, layerwise=True, gap=100, device=device, tied=True) == {}


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
def test_the_counter_sees_the_one_sync_of_a_refresh_step(layerwise):
    """Sharpness: a refresh reads whether the gradient is finite, and the counter catches it."""
    counts = one_step("galore", layerwise, gap=1)
    assert counts.get("tolist", 0) >= 1, counts


def test_the_counter_restores_the_tensor_methods():
    item = torch.Tensor.item
    with HostSyncCounter() as counter:
        torch.ones(()).item()
    assert counter.counts == {"item": 1, "aten._local_scalar_dense": 1} and torch.Tensor.item is item
