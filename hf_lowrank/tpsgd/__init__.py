"""tpSGD: backprop-free, layer-local training with random target projections (arXiv 2208.08503).

`TpSGDTrainer(model=nn.Sequential(...), args=TrainingArguments(...), tpsgd_config=TpSGDConfig(...))` trains
MLPs, CNNs and (multi-layer) RNN/GRU/LSTM classifiers one layer at a time; `mode="drtp"` gives Direct Random
Target Projection and `mode="bp"` the backprop baseline through the same API.
"""
from .config import TpSGDConfig
from .layers import LastTimeStep, plan_layers
from .memory import SavedTensorTracker
from .model import TpSGDModel
from .trainer import InputsLabelsDataset, TpSGDTrainer


__all__ = ["InputsLabelsDataset", "LastTimeStep", "SavedTensorTracker", "TpSGDConfig", "TpSGDModel", "TpSGDTrainer", "plan_layers"]
