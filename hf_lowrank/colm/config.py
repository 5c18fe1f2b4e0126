"""Configuration of CoLM (Nguyen et al., "Mini-batch Coresets for Memory-efficient Language Model Training on Data
Mixtures", ICLR 2025): which examples of each large batch are trained on, and how they are chosen."""
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union


SIMILARITIES = ("l1", "l2", "cosine")
SELECTIONS = ("facility_location", "random")
FEATURES = ("zeroth_order", "backprop")
MEDOID_WEIGHTS = ("cluster", "uniform", "equal")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class CoLMConfig:
    """How a coreset of ``coreset_ratio`` x the large batch is picked from every large batch the dataloader serves.

    The large batch is ``per_device_train_batch_size`` (one selection per micro-batch and process). Every example of
    a small source is kept with weight 1; the rest of the budget is split over the large sources in proportion to
    their share of the batch (floor, then the largest remainders, at least one medoid per source present), and each
    large source's medoids are chosen by facility location on its examples' zeroth-order gradient features. A medoid
    weighs as many examples as are closest to it, so the weighted coreset loss estimates the large batch's loss.

    Args:
        coreset_ratio (`float`, defaults to 0.5): coreset size / large-batch size, in (0, 1] (official code: 64 of
            128).
        source_column (`str`, defaults to ``"source"``): dataset column holding each example's source (int or str).
        small_sources (`list`, *optional*): sources whose examples are always kept. Either this or
            ``small_source_fraction``.
        small_source_fraction (`float`, *optional*): a source is small when its share of the training dataset is
            below this fraction (counted once, from ``train_dataset[source_column]``).
        feature_module (`str`, *optional*): name (or full-match regex) of the one module whose weight gives the
            gradient features. Default: the value projection of the last block (``v_proj``; the V columns of GPT-2's
            fused ``c_attn``); with PEFT LoRA on that module, its ``lora_B`` factor.
        features (`str`, defaults to ``"zeroth_order"``): how each example's gradient on the block is estimated:
            ``"zeroth_order"`` (the paper: two perturbed forwards per direction, no backward; with one direction
            every example's feature is a multiple of the same z) or ``"backprop"`` (the exact per-example gradients,
            the official code's ``masked_grad`` unit: one forward and one backward through the layers above the
            block per chunk). ``epsilon``, ``num_directions`` and ``reuse_prefix`` belong to ``"zeroth_order"``.
        epsilon (`float`, defaults to 1e-3): zeroth-order perturbation size (official code: 1e-3).
        num_directions (`int`, defaults to 1): random directions z averaged per example (each costs two forwards).
        seed (`int`, defaults to 0): the directions of step t are drawn from (seed, t), on CPU, so every device and
            a resumed run draw the same ones. (The official code reuses one z for the whole run.)
        adam_normalize (`bool`, defaults to True): features are Adam updates m_hat / (sqrt(v_hat) + eps) with the
            history set to the mean over the selected examples (the paper's normalisation for Adam training).
        adam_betas (`tuple`, defaults to (0.9, 0.999)) and adam_epsilon (`float`, defaults to 1e-8): of that
            normalisation.
        sparse_dim (`int`, defaults to 2560): per source, keep the dimensions with the largest mean |feature|
            (official code: 2560); all dimensions when the block has fewer.
        similarity (`str`, defaults to ``"l1"``): ``l1`` / ``l2`` (S = max D - D) or ``cosine`` (S = 1 + cos).
        selection (`str`, defaults to ``"facility_location"``): ``"random"`` is the ablation that keeps the small
            sources and the per-source budgets but draws each large source's examples uniformly (seeded like the
            directions), each weighing count / budget; no features are computed.
        medoid_weights (`str`, defaults to ``"cluster"``): how much each facility-location medoid weighs:
            ``"cluster"`` as many examples as are closest to it (CRAIG's weights, the official code's
            ``weightedsubmodlib``), so the coreset gradient estimates the large batch's; ``"uniform"`` count / budget
            for every medoid of a source, the stratified-sampling weight (a lower-variance estimate when clusters are
            uneven); ``"equal"`` every trained example alike, kept small-source examples included (the official
            code's default ``submodlib``: the coreset is trained as a plain mini-batch, which up-weights the kept
            sources). Weights always sum to the large batch's size.
        feature_batch_size (`int`, *optional*): examples per forward of the selection (default: the coreset
            size, so the selection never holds more activations than the training step).
        reuse_prefix (`bool`, defaults to True): the blocks before the feature module run once per chunk and their
            outputs are reused by every perturbed forward (the official "efficient" mode, for any block model).
        matching_every (`int`, defaults to 0): every this many optimizer steps, log the cosine between the coreset's
            and the full large batch's gradient of all trainable parameters (and of a uniform random subset of the
            same size, for reference); computed in chunks of the coreset size. 0 turns it off.
    """

    coreset_ratio: float = field(default=0.5, metadata={"help": "Coreset size / large-batch size, in (0, 1]."})
    source_column: str = field(default="source", metadata={"help": "Dataset column with each example's source."})
    small_sources: Optional[Sequence[Union[int, str]]] = field(
        default=None, metadata={"help": "Sources always kept in full."})
    small_source_fraction: Optional[float] = field(
        default=None, metadata={"help": "Sources below this share of the training set are kept in full."})
    feature_module: Optional[str] = field(
        default=None, metadata={"help": "Module giving the gradient features (default: last block's V projection)."})
    features: str = field(default="zeroth_order", metadata={"help": f"One of {list(FEATURES)}."})
    epsilon: float = field(default=1e-3, metadata={"help": "Zeroth-order perturbation size."})
    num_directions: int = field(default=1, metadata={"help": "Random directions per example."})
    seed: int = field(default=0, metadata={"help": "Seed of the random directions."})
    adam_normalize: bool = field(default=True, metadata={"help": "Adam-normalise the features."})
    adam_betas: tuple = field(default=(0.9, 0.999), metadata={"help": "Betas of the Adam normalisation."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Epsilon of the Adam normalisation."})
    sparse_dim: int = field(default=2560, metadata={"help": "Feature dimensions kept per source."})
    similarity: str = field(default="l1", metadata={"help": f"One of {list(SIMILARITIES)}."})
    selection: str = field(default="facility_location", metadata={"help": f"One of {list(SELECTIONS)}."})
    medoid_weights: str = field(default="cluster", metadata={"help": f"One of {list(MEDOID_WEIGHTS)}."})
    feature_batch_size: Optional[int] = field(default=None, metadata={"help": "Examples per selection forward."})
    reuse_prefix: bool = field(default=True, metadata={"help": "Run the blocks before the feature module once."})
    matching_every: int = field(default=0, metadata={"help": "Steps between gradient-matching logs (0: off)."})

    def __post_init__(self):
        if not _is_number(self.coreset_ratio) or not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"CoLMConfig: `coreset_ratio` must be in (0, 1] (coreset size / large-batch size), got "
                             f"{self.coreset_ratio!r}.")
        if not isinstance(self.source_column, str) or not self.source_column:
            raise ValueError(f"CoLMConfig: `source_column` must be a column name, got {self.source_column!r}.")
        if self.small_sources is not None and self.small_source_fraction is not None:
            raise ValueError("CoLMConfig: pass either `small_sources` or `small_source_fraction`, not both.")
        if self.small_sources is not None:
            if isinstance(self.small_sources, (str, bytes)) or not all(
                    isinstance(s, (int, str)) for s in self.small_sources):
                raise ValueError(f"CoLMConfig: `small_sources` must be a list of source values (int or str), got "
                                 f"{self.small_sources!r}.")
            self.small_sources = list(self.small_sources)
        if self.small_source_fraction is not None and (
                not _is_number(self.small_source_fraction) or not 0 < self.small_source_fraction < 1):
            raise ValueError(f"CoLMConfig: `small_source_fraction` must be in (0, 1), got "
                             f"{self.small_source_fraction!r}.")
        if self.feature_module is not None and (not isinstance(self.feature_module, str) or not self.feature_module):
            raise ValueError(f"CoLMConfig: `feature_module` must be a module name or regex, got "
                             f"{self.feature_module!r}.")
        if self.features not in FEATURES:
            raise ValueError(f"CoLMConfig: `features`={self.features!r}; use one of {list(FEATURES)}.")
        if self.features == "backprop":
            zeroth_order_only = {"epsilon": 1e-3, "num_directions": 1, "reuse_prefix": True}
            changed = [name for name, default in zeroth_order_only.items() if getattr(self, name) != default]
            if changed:
                raise ValueError(f"CoLMConfig: {changed} only apply to features='zeroth_order'; with "
                                 "features='backprop' the gradients are exact. Leave them at their defaults.")
        if not _is_number(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"CoLMConfig: `epsilon` must be > 0, got {self.epsilon!r}.")
        for name in ("num_directions", "sparse_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"CoLMConfig: `{name}` must be an int >= 1, got {value!r}.")
        if not _is_int(self.seed):
            raise ValueError(f"CoLMConfig: `seed` must be an int, got {self.seed!r}.")
        for name in ("adam_normalize", "reuse_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CoLMConfig: `{name}` must be True or False, got {getattr(self, name)!r}.")
        betas = tuple(self.adam_betas) if isinstance(self.adam_betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"CoLMConfig: `adam_betas` must be two numbers in [0, 1), got {self.adam_betas!r}.")
        self.adam_betas = betas
        if not _is_number(self.adam_epsilon) or self.adam_epsilon <= 0:
            raise ValueError(f"CoLMConfig: `adam_epsilon` must be > 0, got {self.adam_epsilon!r}.")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"CoLMConfig: `similarity`={self.similarity!r}; use one of {list(SIMILARITIES)}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"CoLMConfig: `selection`={self.selection!r}; use one of {list(SELECTIONS)}.")
        if self.medoid_weights not in MEDOID_WEIGHTS:
            raise ValueError(f"CoLMConfig: `medoid_weights`={self.medoid_weights!r}; use one of "
                             f"{list(MEDOID_WEIGHTS)}.")
        if self.feature_batch_size is not None and (not _is_int(self.feature_batch_size)
                                                    or self.feature_batch_size < 1):
            raise ValueError(f"CoLMConfig: `feature_batch_size` must be an int >= 1 or None, got "
                             f"{self.feature_batch_size!r}.")
        if not _is_int(self.matching_every) or self.matching_every < 0:
            raise ValueError(f"CoLMConfig: `matching_every` must be an int >= 0 (0: off), got "
                             f"{self.matching_every!r}.")

    def coreset_size(self, batch_size: int) -> int:
        """Examples trained on out of a large batch of ``batch_size`` (at least one)."""
        return max(1, round(self.coreset_ratio * batch_size))

    def to_dict(self) -> dict:
        return asdict(self)
