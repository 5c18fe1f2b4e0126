"""``QGaLoreConfig``: which linear layers hold quantized weights, and how."""
from dataclasses import asdict, dataclass, field
from typing import Union

from ..utils.quantization import check_bits
from ..utils.targets import normalize_target_modules


WEIGHT_BITS = (4, 8)


@dataclass
class QGaLoreConfig:
    """Q-GaLore's weight quantization (Zhang et al. 2024, arXiv 2407.08296).

    ``target_modules`` follows transformers' ``optim_target_modules`` (default: the attention and MLP projections,
    as Q-GaLore's pre-training script); only ``nn.Linear`` modules can be targeted. Weights are stored as
    ``weight_bits`` codes with an fp32 scale and zero point per ``group_size`` consecutive inputs of a row, and
    re-quantized after every update with stochastic rounding (unbiased; ``stochastic_rounding=False`` rounds to
    nearest, which loses updates smaller than half a level). ``seed`` makes the rounding noise deterministic per
    layer and step (replicas agree, resume reproduces). ``simulate=True`` is the fake-quant reference: fp32
    weights that are quantized and dequantized after every update, with the same noise.
    """

    target_modules: Union[str, list[str]] = field(default_factory=lambda: ["attn", "mlp"])
    weight_bits: int = 8
    group_size: int = 256
    stochastic_rounding: bool = True
    seed: int = 0
    simulate: bool = False

    def __post_init__(self):
        self.target_modules = normalize_target_modules(self.target_modules)
        check_bits(self.weight_bits, "weight_bits", WEIGHT_BITS)
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"`group_size` must be a positive int (Q-GaLore uses 256), got {self.group_size!r}.")
        for name in ("stochastic_rounding", "simulate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}.")

    def to_dict(self) -> dict:
        return asdict(self)
