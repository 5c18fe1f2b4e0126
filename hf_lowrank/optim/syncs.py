"""Count the host reads of device values (the syncs that stall a GPU step) while a block of code runs.

Counted two ways, so CPU runs catch what would block on a GPU: every call of the ``torch.Tensor`` methods that
read a value into Python (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool`` / ``int`` / ``float``,
``nonzero``; patched for the duration, so calls inside autograd hooks count too), and the ``aten`` ops they reach
(``_local_scalar_dense``, ``nonzero``, ``is_nonzero``) through a ``TorchDispatchMode``.

    with HostSyncCounter() as counter:
        optimizer.step()
    assert counter.total == 0, counter.counts
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero")
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero")


class HostSyncCounter(TorchDispatchMode):
    """``counts``: ``{method or "aten.<op>": calls}`` seen inside the ``with`` block; ``total``: their sum."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self._originals: dict = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def __enter__(self):
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self._count(_name)
                return _original(*args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._originals.items():
                setattr(torch.Tensor, name, original)
            self._originals.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS:
            self._count(f"aten.{name}")
        return func(*args, **(kwargs or {}))
