"""CoLM: mini-batch coresets for memory-efficient LM training on data mixtures (Nguyen et al., ICLR 2025).

`CoLMTrainer(model, TrainingArguments(per_device_train_batch_size=2b, ...), colm_config=CoLMConfig(...),
train_dataset=ds)` serves large batches of 2b, trains a weighted coreset of b from each (small sources kept whole,
facility-location medoids of zeroth-order or exact gradient features for the rest), and needs the memory of batch
b.
"""
from .config import CoLMConfig
from .features import FeatureBlock, backprop_features, find_feature_block, zeroth_order_features
from .selection import facility_location_value, lazy_greedy, medoid_weights, plan_batch, source_budgets
from .trainer import CoLMTrainer, SourceCollator


__all__ = ["CoLMConfig", "CoLMTrainer", "FeatureBlock", "SourceCollator", "backprop_features",
           "facility_location_value", "find_feature_block", "lazy_greedy", "medoid_weights", "plan_batch",
           "source_budgets", "zeroth_order_features"]
