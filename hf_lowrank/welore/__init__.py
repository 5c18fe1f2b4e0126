"""WeLore: data-agnostic low-rank compression, then fine-tuning of only the low-rank components.

>>> from hf_lowrank.welore import WeLoreConfig, compress
>>> welore = compress(model, WeLoreConfig(rank_reduction=0.5))   # `model` is changed in place
>>> Trainer(model=model, ...).train()                            # trains only the LRC factors
>>> welore.save_pretrained("out")                                # config + factors + model card
>>> dense = WeLoreModel.from_pretrained(base_model, "out").merge_and_unload()
"""
from ..tuners import register_tuner
from .config import WeLoreConfig
from .layer import WeLoreLinear, svd_factors
from .model import LayerPlan, WeLoreModel, compress, find_threshold, normalized_spectrum


register_tuner("welore", WeLoreConfig, WeLoreModel)

__all__ = [
    "LayerPlan", "WeLoreConfig", "WeLoreLinear", "WeLoreModel", "compress", "find_threshold",
    "normalized_spectrum", "svd_factors",
]
