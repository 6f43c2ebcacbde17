"""Building blocks: MLP, target attention, scenario gate (EPNet-style), MMoE layer (msmt's PLE layer is split
by input block inside mtrec.models.ranker.MSMT)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(dims: list[int], dropout: float = 0.0, last_activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or last_activation:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class TargetAttention(nn.Module):
    """Attention of the candidate item over the user's behaviour sequence (DIN-style, scaled dot product).

    keys [B, L, d], mask [B, L] (True = real item), query [B, d] -> pooled [B, d]; a user without history
    gets a learned 'no history' vector.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.empty = nn.Parameter(torch.zeros(dim))
        self.scale = dim ** -0.5

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.k(keys)

    def forward(self, query: torch.Tensor, projected_keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("bd,bld->bl", self.q(query), projected_keys) * self.scale
        scores = scores.masked_fill(~mask, float("-inf"))
        has = mask.any(dim=1, keepdim=True)
        weights = torch.softmax(torch.where(has, scores, torch.zeros_like(scores)), dim=1) * has
        pooled = torch.einsum("bl,bld->bd", weights, values)
        return torch.where(has, pooled, self.empty.expand_as(pooled))


class ScenarioGate(nn.Module):
    """Scenario-conditioned element-wise gate on the input (EPNet): x * 2 * sigmoid(MLP([scenario, sg(x)]))."""

    def __init__(self, in_dim: int, scenario_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim + scenario_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)  # starts as the identity gate (2 * sigmoid(0) = 1)

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        return x * 2.0 * torch.sigmoid(self.net(torch.cat([scenario, x.detach()], dim=1)))


class MMoELayer(nn.Module):
    """Multi-gate mixture of experts: all experts shared, one softmax gate per task."""

    def __init__(self, in_dim: int, expert_dim: int, n_tasks: int, n_experts: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.experts = nn.ModuleList([mlp([in_dim, expert_dim], dropout) for _ in range(n_experts)])
        self.gates = nn.ModuleList([nn.Linear(in_dim, n_experts) for _ in range(n_tasks)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        experts = torch.stack([e(x) for e in self.experts], dim=1)
        return [(experts * torch.softmax(g(x), dim=1).unsqueeze(-1)).sum(dim=1) for g in self.gates]
