"""Measure the activations autograd keeps for backward, with `torch.autograd.graph.saved_tensors_hooks`.

Every tensor a graph saves is wrapped in a small handle; the handle dies with the graph, so the tracker knows
which bytes are alive at any moment. Bytes are counted per storage (views of one tensor count once) and the
model's parameters are left out, so the figure is the saved-activation memory of a step.
"""
import contextlib
from collections import defaultdict
from typing import Callable, Dict, Hashable, Iterable

import torch


class _Saved:
    __slots__ = ("tensor", "key", "label", "tracker")

    def __init__(self, tensor, key, label, tracker):
        self.tensor, self.key, self.label, self.tracker = tensor, key, label, tracker

    def __del__(self):
        if self.key is not None:
            self.tracker._release(self.key, self.label)


class SavedTensorTracker:
    """Live and peak saved-activation bytes, overall and per label (e.g. per layer)."""

    def __init__(self, parameters: Callable[[], Iterable[torch.Tensor]] = tuple):
        self._parameters = parameters  # called on every `track`, so moving the model to a device is fine
        self._excluded = set()
        self._refs: Dict[int, int] = {}
        self._bytes: Dict[int, int] = {}
        self._label_bytes: Dict[Hashable, int] = defaultdict(int)
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_bytes_per_label: Dict[Hashable, int] = defaultdict(int)
        self.max_live_labels = 0

    def reset_peaks(self) -> None:
        self.peak_bytes = self.live_bytes
        self.peak_bytes_per_label = defaultdict(int)
        self.max_live_labels = sum(1 for v in self._label_bytes.values() if v > 0)

    def _pack(self, tensor: torch.Tensor, label: Hashable):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded or storage.nbytes() == 0:
            return _Saved(tensor, None, label, self)
        key = (key, label)
        if key not in self._refs:
            self._refs[key] = 0
            self._bytes[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self._label_bytes[label] += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.peak_bytes_per_label[label] = max(self.peak_bytes_per_label[label], self._label_bytes[label])
            self.max_live_labels = max(self.max_live_labels, sum(1 for v in self._label_bytes.values() if v > 0))
        self._refs[key] += 1
        return _Saved(tensor, key, label, self)

    def _release(self, key, label) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            nbytes = self._bytes.pop(key)
            del self._refs[key]
            self.live_bytes -= nbytes
            self._label_bytes[label] -= nbytes

    @contextlib.contextmanager
    def track(self, label: Hashable = "all"):
        """Count what graphs built inside this block save, under `label`."""
        self._excluded = {p.untyped_storage().data_ptr() for p in self._parameters()}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, label), lambda saved: saved.tensor):
            yield self

    def report(self) -> dict:
        return {
            "peak_saved_bytes": self.peak_bytes,
            "live_saved_bytes": self.live_bytes,
            "max_layers_alive": self.max_live_labels,
            "peak_saved_bytes_per_layer": dict(self.peak_bytes_per_label),
        }
