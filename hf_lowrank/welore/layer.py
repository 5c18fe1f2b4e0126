"""The WeLore low-rank component: an ``nn.Linear`` replaced by two factors and no dense weight."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.targets import is_conv1d, linear_weight


def svd_factors(weight: torch.Tensor, rank: int, svd_dtype: torch.dtype = torch.float32):
    """Balanced rank-`rank` factors of `weight` (out×in): ``U_k·√S_k`` (out×k) and ``√S_k·V_kᵀ`` (k×in).

    ``up @ down`` is the best rank-k approximation of `weight` (Eckart–Young); splitting √S evenly keeps
    both factors on the same scale, which is what makes training them with one learning rate work.
    """
    u, s, vh = torch.linalg.svd(weight.detach().to(svd_dtype), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


class WeLoreLinear(nn.Module):
    """``y = U (V x) + b`` with ``welore_U`` (out×k) and ``welore_V`` (k×in); the dense weight is gone.

    Cheaper than the dense layer in parameters and FLOPs whenever ``k·(in+out) < in·out``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | None = None, conv1d: bool = False):
        super().__init__()
        self.conv1d = conv1d  # replaces a transformers Conv1D (GPT-2): merged back into one
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"`rank` must be in [1, {min(in_features, out_features)}] for a "
                             f"{out_features}x{in_features} layer, got {rank}.")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kwargs = {"dtype": dtype, "device": device}
        self.welore_U = nn.Parameter(torch.empty(out_features, rank, **kwargs))
        self.welore_V = nn.Parameter(torch.empty(rank, in_features, **kwargs))
        self.bias = nn.Parameter(torch.empty(out_features, **kwargs), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, svd_dtype: torch.dtype = torch.float32) -> "WeLoreLinear":
        """From an ``nn.Linear`` or a transformers ``Conv1D`` (whose weight is stored transposed)."""
        weight = linear_weight(linear)
        layer = cls(weight.shape[1], weight.shape[0], rank, bias=linear.bias is not None, dtype=weight.dtype,
                    device=weight.device, conv1d=is_conv1d(linear))
        up, down = svd_factors(weight, rank, svd_dtype)
        with torch.no_grad():
            layer.welore_U.copy_(up)
            layer.welore_V.copy_(down)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.welore_V), self.welore_U, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The merged weight ``U @ V`` (out×in)."""
        return self.welore_U @ self.welore_V

    def to_linear(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``, if it replaced one) computing the same function (the merge of
        WeLore issue #3)."""
        weight = self.welore_U.detach()
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            linear = Conv1D(self.out_features, self.in_features).to(dtype=weight.dtype, device=weight.device)
        else:
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            linear_weight(linear).copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
