"""The optimizer step never waits for the device outside refreshes: no ``.item()``, ``.tolist()``, ``.cpu()``,
``bool(tensor)``, ``.nonzero()`` (the host reads a device value) in ``step()`` or in the layer-wise hooks.

Counted two ways, so CPU runs catch what would block on a GPU: every call of those ``torch.Tensor`` methods (the
Python entry points, patched for the duration; they run inside backward hooks too), and ``aten._local_scalar_dense``
/ ``aten.nonzero`` dispatches (what the methods reach on CUDA) through a ``TorchDispatchMode``.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_lowrank.optim import available_modes, create_optimizer
from tests.conftest import make_tiny_llama, prepare_for_mode


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero")
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero")


class SyncCounter(TorchDispatchMode):
    def __init__(self, monkeypatch):
        super().__init__()
        self.counts = {}
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS:
            self.counts[f"aten.{name}"] = self.counts.get(f"aten.{name}", 0) + 1
        return func(*args, **(kwargs or {}))


def one_step(mode, layerwise, gap, monkeypatch, device="cpu"):
    model = prepare_for_mode(make_tiny_llama().to(device), mode)
    optimizer = create_optimizer(model, mode, rank=8, update_proj_gap=gap, lr=1e-3, min_8bit_size=256,
                                 layerwise=layerwise)
    ids = torch.randint(0, 256, (2, 8), device=device)
    model(input_ids=ids, labels=ids).loss.backward()  # the first step refreshes every projector
    optimizer.step()
    optimizer.zero_grad()
    with monkeypatch.context() as patch:
        counter = SyncCounter(patch)
        with counter:
            model(input_ids=ids, labels=ids).loss.backward()  # layer-wise: the updates run in here
            optimizer.step()
    if layerwise:
        optimizer.remove_hooks()
    return counter.counts


@pytest.mark.device
@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("mode", available_modes())
def test_a_step_without_refresh_never_reads_the_device_from_the_host(monkeypatch, device, mode, layerwise):
    assert one_step(mode, layerwise, gap=100, monkeypatch=monkeypatch, device=device) == {}


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
def test_the_counter_sees_the_one_sync_of_a_refresh_step(monkeypatch, layerwise):
    """Sharpness: a refresh reads whether the gradient is finite, and the counter catches it."""
    counts = one_step("galore", layerwise, gap=1, monkeypatch=monkeypatch)
    assert counts.get("tolist", 0) >= 1, counts
