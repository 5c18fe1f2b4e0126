"""Q-GaLore (Zhang et al. 2024, arXiv 2407.08296): INT8 weights with stochastic rounding, INT4 projectors and lazy
layer-adaptive subspace refresh.

``prepare_model_for_qgalore(model)`` quantizes the targeted linear layers; the ``q_galore`` optimizer mode
(``create_optimizer(model, "q_galore")`` / ``optimizer_factory("q_galore")``) trains them through their update
sinks. ``save_qgalore`` / ``load_qgalore`` keep the quantized form; ``export_dense`` writes a plain checkpoint.
"""
from .config import QGaLoreConfig
from .layer import FakeQuantSink, QuantLinear, WeightQuantizer
from .model import (dense_state_dict, export_dense, load_qgalore, prepare_model_for_qgalore, quantized_layers,
                    save_qgalore)


__all__ = ["FakeQuantSink", "QGaLoreConfig", "QuantLinear", "WeightQuantizer", "dense_state_dict", "export_dense",
           "load_qgalore", "prepare_model_for_qgalore", "quantized_layers", "save_qgalore"]
