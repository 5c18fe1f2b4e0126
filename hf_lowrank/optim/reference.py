"""A short, readable GaLore-AdamW written straight from the paper (Zhao et al. 2024, Algorithm 2).

It exists only to test :class:`~hf_lowrank.optim.ProjectedOptimizer` against (one loop, one parameter at a
time, no projector classes, no foreach): groups with ``rank`` are projected, other groups are plain AdamW.
"""
import math

import torch


class ReferenceGaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, grad = self.state[p], p.grad
                if not state:
                    state["t"] = 0
                projected = "rank" in group
                if projected:
                    if state["t"] % group["update_proj_gap"] == 0:  # refresh P from the SVD of the gradient
                        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
                        tall = grad.shape[0] >= grad.shape[1]
                        state["P"] = vh[: group["rank"]].T if tall else u[:, : group["rank"]]
                        state["right"] = tall
                    P = state["P"]
                    grad = grad @ P if state["right"] else P.T @ grad
                if "m" not in state:
                    state["m"], state["v"] = torch.zeros_like(grad), torch.zeros_like(grad)
                state["t"] += 1
                t = state["t"]
                state["m"] = beta1 * state["m"] + (1 - beta1) * grad
                state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
                n = state["m"] / (state["v"].sqrt() + group["eps"])
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                if projected:
                    n = group["scale"] * (n @ state["P"].T if state["right"] else state["P"] @ n)
                p -= step_size * n
                p -= group["lr"] * group["weight_decay"] * p
