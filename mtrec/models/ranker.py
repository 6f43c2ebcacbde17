"""Rankers: `msmt` (the default) and the baselines `shared_bottom`, `mmoe`, `single_task`.

Every ranker splits its forward pass in three so that batch scoring computes each side once:

    user_side(batch, text)  -> tensors per (user, scenario) row (embeddings, projected behaviour sequence)
    item_side(batch, text)  -> tensors per (item, scenario) row (id/attribute embeddings, title projection)
    pair(u, i, scenario)    -> {task: probability}, u and i gathered to the pairs

and `forward(batch, text) = pair(user_side(batch), item_side(batch), batch["scenario"])` for training.
`text` is the item title-embedding matrix [n_items + 1, text_dim]; batches carry row indices into it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mtrec.models.layers import MMoELayer, ScenarioGate, TargetAttention, mlp

USER_KEYS = ("user", "user_cat", "user_num", "seq", "seq_text")
ITEM_KEYS = ("item", "item_cat", "item_num", "text")


@dataclass
class ModelSpec:
    """Everything needed to rebuild a ranker's modules (saved in the artifact's metadata)."""

    name: str
    tasks: list[str]
    parents: dict[str, str | None]
    n_users: int
    n_items: int
    n_scenarios: int
    user_cat: list[int] = field(default_factory=list)
    item_cat: list[int] = field(default_factory=list)
    user_num: int = 0
    item_num: int = 0
    text_dim: int = 0
    sequence_length: int = 0
    embedding_dim: int = 16
    hidden_dims: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0
    n_shared_experts: int = 2
    n_task_experts: int = 1
    n_mmoe_experts: int = 4
    # msmt only: [position in the side's numeric vector, mean, std] of each smoothed-rate column, so the
    # wide part can see log-odds of the un-normalized rates (a popularity score enters on its own scale)
    user_rates: list[list[float]] = field(default_factory=list)
    item_rates: list[list[float]] = field(default_factory=list)
    # msmt: a match score <user vector, item vector> in the item-key space: the user vector is the sum of the
    # user id and attribute embeddings plus the mean of the behaviour sequence's item keys, the item vector the
    # item key plus its attribute embeddings; weighted per scenario x task
    match: bool = False

    def to_json(self) -> dict:
        return asdict(self)


class InputLayer(nn.Module):
    """Embeddings of ids, attributes and scenario; numeric features pass through (already normalized)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d = spec.embedding_dim
        self.spec = spec
        self.user = nn.Embedding(spec.n_users, d)
        self.item = nn.Embedding(spec.n_items, d, padding_idx=0)
        self.scenario = nn.Embedding(spec.n_scenarios, d)
        self.user_cat = nn.ModuleList([nn.Embedding(n, d) for n in spec.user_cat])
        self.item_cat = nn.ModuleList([nn.Embedding(n, d) for n in spec.item_cat])
        self.text = nn.Linear(spec.text_dim, d) if spec.text_dim else None
        for emb in (self.user, self.item, self.scenario, *self.user_cat, *self.item_cat):
            nn.init.normal_(emb.weight, std=0.05)

    @property
    def user_dim(self) -> int:
        return self.spec.embedding_dim * (1 + len(self.spec.user_cat)) + self.spec.user_num

    @property
    def item_dim(self) -> int:
        return self.spec.embedding_dim * (2 + len(self.spec.item_cat)) + self.spec.item_num

    def item_key(self, item: torch.Tensor, text_idx: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The vector an item is known by (in sequences and as the attention query): id + title projection."""
        key = self.item(item)
        if self.text is not None:
            if text.shape[0] <= text_idx.numel():  # project the (small) catalogue once, then gather
                key = key + self.text(text)[text_idx]
            else:
                key = key + self.text(text[text_idx])
        return key

    def user_vector(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.user(b["user"])] + [e(b["user_cat"][:, j]) for j, e in enumerate(self.user_cat)]
        return torch.cat(parts + [b["user_num"]], dim=1)

    def item_vector(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.item_key(b["item"], b["text"], text)
        parts = [self.item(b["item"]), key] + [e(b["item_cat"][:, j]) for j, e in enumerate(self.item_cat)]
        return torch.cat(parts + [b["item_num"]], dim=1), key

    def sequence(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "seq" not in b or b["seq"].shape[1] == 0:
            n = b["user"].shape[0]
            return torch.zeros(n, 0, self.spec.embedding_dim, device=b["user"].device), \
                torch.zeros(n, 0, dtype=torch.bool, device=b["user"].device)
        return self.item_key(b["seq"], b["seq_text"], text), b["seq"] != 0


def _mean_pool(keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(keys.dtype)
    return (keys * m).sum(1) / m.sum(1).clamp_min(1.0)


class Ranker(nn.Module):
    """Base: shared input layer, mean-pooled sequence, independent task heads (overridden by subclasses)."""

    traceable = True  # the pair computation has no data-dependent control flow (batch scoring may trace it)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.inputs = InputLayer(spec)
        d = spec.embedding_dim
        self.in_dim = self.inputs.user_dim + self.inputs.item_dim + 3 * d  # + scenario, pooled sequence, key*pooled

    def user_side(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> dict[str, torch.Tensor]:
        keys, mask = self.inputs.sequence(b, text)
        return {"u": self.inputs.user_vector(b), "seq": keys, "mask": mask}

    def item_side(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> dict[str, torch.Tensor]:
        vec, key = self.inputs.item_vector(b, text)
        return {"i": vec, "key": key}

    def pooled(self, u: dict[str, torch.Tensor], i: dict[str, torch.Tensor]) -> torch.Tensor:
        return _mean_pool(u["seq"], u["mask"]) if u["seq"].shape[1] else torch.zeros_like(i["key"])

    def features(self, u: dict, i: dict, scenario: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.inputs.scenario(scenario)
        pooled = self.pooled(u, i)
        return torch.cat([u["u"], i["i"], s, pooled, pooled * i["key"]], dim=1), s

    def pair(self, u: dict, i: dict, scenario: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pair(self.user_side(b, text), self.item_side(b, text), b["scenario"], text)

    def _probs(self, logits: list[torch.Tensor], chain: bool) -> dict[str, torch.Tensor]:
        """Task probabilities; with `chain`, a dependent task is p(parent) * p(task | parent) (ESMM)."""
        out: dict[str, torch.Tensor] = {}
        for name, z in zip(self.spec.tasks, logits, strict=True):
            p = torch.sigmoid(z.squeeze(-1).float())
            parent = self.spec.parents.get(name)
            out[name] = out[parent] * p if chain and parent else p
        return out


class _RateLogOdds(nn.Module):
    """Log-odds of smoothed-rate features, recovered from their normalized values (z * std + mean)."""

    def __init__(self, rates: list[list[float]]) -> None:
        super().__init__()
        r = torch.tensor(rates, dtype=torch.float32).reshape(-1, 3)
        self.register_buffer("pos", r[:, 0].long(), persistent=False)
        self.register_buffer("mean", r[:, 1], persistent=False)
        self.register_buffer("std", r[:, 2], persistent=False)

    def forward(self, num: torch.Tensor) -> torch.Tensor:
        if not len(self.pos):
            return num[:, :0]
        p = (num[:, self.pos] * self.std + self.mean).clamp(1e-4, 1 - 1e-4)
        return torch.log(p) - torch.log1p(-p)


class MSMT(Ranker):
    """Multi-scenario multi-task ranker.

    Inputs: id/attribute/scenario embeddings, normalized numerics, the projected title embedding. Each side's
    input passes a scenario-conditioned gate (EPNet-style, conditioned on the scenario and the side itself), then
    a progressive layered extraction layer (shared and task-specific experts, per-task gates that see the
    scenario) whose first layer is split by input block: the user+scenario block and the item block are computed
    once per (user, scenario) and once per (item, scenario); only the block of the target attention over the
    behaviour sequence (candidate x history) is computed per pair. One tower per task; a wide linear part over the
    numeric features and the log-odds of the smoothed rates (popularity enters on its own scale), a per-scenario
    task bias, and a user x item match score of summed field embeddings; ESMM chaining of dependent tasks.

    `grid` scores users [B] against candidates [B, C] without copying user-side tensors per candidate;
    `pair` (training, per-row) is the same computation with C = 1.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        d, h = spec.embedding_dim, spec.hidden_dims
        n_tasks = len(spec.tasks)
        self.attention = TargetAttention(d)
        self.user_gate = ScenarioGate(self.inputs.user_dim, d)
        self.item_gate = ScenarioGate(self.inputs.item_dim, d)
        self.n_shared, self.n_task = spec.n_shared_experts, spec.n_task_experts
        self.n_experts = self.n_shared + n_tasks * self.n_task
        self.n_gate = self.n_shared + self.n_task
        self.hidden = h[0]
        du, di, dp = self.inputs.user_dim + d, self.inputs.item_dim, 2 * d
        # first layer of every expert, and the PLE gates, split by input block: user+scenario | item | pair
        self.expert_u = nn.Linear(du, self.n_experts * self.hidden)
        self.expert_i = nn.Linear(di, self.n_experts * self.hidden, bias=False)
        self.expert_p = nn.Linear(dp, self.n_experts * self.hidden, bias=False)
        self.gate_u = nn.Linear(du, n_tasks * self.n_gate)
        self.gate_i = nn.Linear(di, n_tasks * self.n_gate, bias=False)
        self.gate_p = nn.Linear(dp, n_tasks * self.n_gate, bias=False)
        route = torch.zeros(n_tasks, self.n_gate, self.n_experts)  # task t, gate slot g -> expert e
        for t in range(n_tasks):
            own = [self.n_shared + t * self.n_task + k for k in range(self.n_task)]
            for g, e in enumerate(own + list(range(self.n_shared))):
                route[t, g, e] = 1.0
        self.register_buffer("route", route, persistent=False)
        self.expert_dropout = nn.Dropout(spec.dropout)
        self.towers = nn.ModuleList([mlp([h[0], *h[1:], 1], spec.dropout, last_activation=False) for _ in spec.tasks])
        self.user_rates = _RateLogOdds(spec.user_rates)
        self.item_rates = _RateLogOdds(spec.item_rates)
        self.n_user_wide = spec.user_num + len(spec.user_rates)
        self.wide = nn.Linear(self.n_user_wide + spec.item_num + len(spec.item_rates), n_tasks)
        nn.init.zeros_(self.wide.weight)  # no direction before data: an untrained model ranks at random, not inverted
        self.scenario_bias = nn.Embedding(spec.n_scenarios, n_tasks)
        nn.init.zeros_(self.scenario_bias.weight)
        if spec.match:
            self.match_weight = nn.Embedding(spec.n_scenarios, n_tasks)
            nn.init.ones_(self.match_weight.weight)

    # -- per side: computed once per (user, scenario) and once per (item, scenario) -----------------------
    def user_side(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.spec.embedding_dim
        s = self.inputs.scenario(b["scenario"])
        raw = self.inputs.user_vector(b)
        x = torch.cat([self.user_gate(raw, s), s], dim=1)
        keys, mask = self.inputs.sequence(b, text)
        wide_in = torch.cat([b["user_num"], self.user_rates(b["user_num"])], dim=1)
        u = {"a": self.expert_u(x), "g": self.gate_u(x), "seq": keys, "seq_k": self.attention.project_keys(keys),
             "mask": mask, "scenario": b["scenario"],
             "w": F.linear(wide_in, self.wide.weight[:, :self.n_user_wide], self.wide.bias)
             + self.scenario_bias(b["scenario"])}
        if self.spec.match:
            n = 1 + len(self.spec.user_cat)
            m = raw[:, :d * n].reshape(-1, n, d).sum(1)  # id + attribute embeddings (InputLayer order)
            u["m"] = m + _mean_pool(keys, mask) if keys.shape[1] else m
        return u

    def item_side(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.spec.embedding_dim
        s = self.inputs.scenario(b["scenario"])
        raw, key = self.inputs.item_vector(b, text)
        x = self.item_gate(raw, s)
        wide_in = torch.cat([b["item_num"], self.item_rates(b["item_num"])], dim=1)
        i = {"a": self.expert_i(x), "g": self.gate_i(x), "key": key,
             "w": F.linear(wide_in, self.wide.weight[:, self.n_user_wide:])}
        if self.spec.match:
            n = len(self.spec.item_cat)
            i["m"] = key + raw[:, 2 * d:(2 + n) * d].reshape(-1, n, d).sum(1) if n else key
        return i

    # -- per pair: attention, the pair block of the first layer, expert mixing, towers ---------------------
    def grid(self, u: dict, i: dict, scenario: torch.Tensor | None, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """u: tensors per user [B, ...]; i: tensors per candidate [B, C, ...] -> {task: [B, C]}."""
        key = i["key"]
        B, C = key.shape[:2]
        if u["seq"].shape[1]:
            scores = torch.einsum("bcd,bld->bcl", self.attention.q(key), u["seq_k"]) * self.attention.scale
            mask = u["mask"].unsqueeze(1)
            has = mask.any(-1, keepdim=True)
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(torch.where(has, scores, torch.zeros_like(scores)), -1) * has
            pooled = torch.where(has, torch.einsum("bcl,bld->bcd", weights, u["seq"]), self.attention.empty)
        else:
            pooled = self.attention.empty.expand_as(key)
        p = torch.cat([pooled, pooled * key], -1)
        h = torch.relu(u["a"].unsqueeze(1) + i["a"] + self.expert_p(p))
        h = self.expert_dropout(h).view(B, C, self.n_experts, self.hidden)
        n_tasks = len(self.spec.tasks)
        g = (u["g"].unsqueeze(1) + i["g"] + self.gate_p(p)).view(B, C, n_tasks, self.n_gate).softmax(-1)
        z = torch.einsum("bcte,bceh->bcth", torch.einsum("bctg,tge->bcte", g, self.route), h)
        wide = u["w"].unsqueeze(1) + i["w"]
        if self.spec.match:
            wide = wide + torch.einsum("bd,bcd->bc", u["m"], i["m"]).unsqueeze(-1) \
                * self.match_weight(u["scenario"]).unsqueeze(1)
        logits = [tower(z[:, :, t]) + wide[..., t:t + 1] for t, tower in enumerate(self.towers)]
        return self._probs(logits, chain=True)

    def pair(self, u: dict, i: dict, scenario: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.grid(u, {k: v.unsqueeze(1) for k, v in i.items()}, scenario, text)
        return {t: p.squeeze(1) for t, p in out.items()}


class SharedBottom(Ranker):
    """Baseline: one shared MLP bottom, one tower per task, tasks predicted independently."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        h = spec.hidden_dims
        self.bottom = mlp([self.in_dim, h[0]], spec.dropout)
        self.towers = nn.ModuleList([mlp([h[0], *h[1:], 1], spec.dropout, last_activation=False) for _ in spec.tasks])

    def pair(self, u: dict, i: dict, scenario: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        x, _ = self.features(u, i, scenario)
        z = self.bottom(x)
        return self._probs([t(z) for t in self.towers], chain=False)


class MMoE(Ranker):
    """Baseline: multi-gate mixture of experts (Ma et al. 2018), tasks predicted independently."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        h = spec.hidden_dims
        self.mmoe = MMoELayer(self.in_dim, h[0], len(spec.tasks), spec.n_mmoe_experts, spec.dropout)
        self.towers = nn.ModuleList([mlp([h[0], *h[1:], 1], spec.dropout, last_activation=False) for _ in spec.tasks])

    def pair(self, u: dict, i: dict, scenario: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        x, _ = self.features(u, i, scenario)
        return self._probs([t(z) for t, z in zip(self.towers, self.mmoe(x), strict=True)], chain=False)


class SingleTask(nn.Module):
    """Baseline: one small independent network (own embeddings included) per scenario x task."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        small = ModelSpec(**{**spec.to_json(), "embedding_dim": max(4, spec.embedding_dim // 2)})
        self.nets = nn.ModuleDict()
        for s in range(1, spec.n_scenarios):  # 1 = unknown scenario, 2.. = known ones
            for t in spec.tasks:
                net = Ranker(small)
                net.head = mlp([net.in_dim, spec.hidden_dims[-1], 1], spec.dropout, last_activation=False)
                self.nets[f"s{s}_{t}"] = net

    def user_side(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: b[k] for k in USER_KEYS if k in b}

    def item_side(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: b[k] for k in ITEM_KEYS if k in b}

    def pair(self, u: dict, i: dict, scenario: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        b = {**u, **i}
        out = {t: torch.zeros(scenario.shape[0], device=scenario.device) for t in self.spec.tasks}
        for s in torch.unique(scenario).tolist():
            rows = (scenario == s).nonzero(as_tuple=True)[0]
            sub = {k: v[rows] for k, v in b.items()}
            for t in self.spec.tasks:
                net = self.nets[f"s{max(int(s), 1)}_{t}"]
                x, _ = net.features(net.user_side(sub, text), net.item_side(sub, text), scenario[rows])
                out[t] = out[t].index_copy(0, rows, torch.sigmoid(net.head(x).squeeze(-1).float()))
        return out

    def forward(self, b: dict[str, torch.Tensor], text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pair(self.user_side(b, text), self.item_side(b, text), b["scenario"], text)


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "msmt": MSMT, "shared_bottom": SharedBottom, "mmoe": MMoE, "single_task": SingleTask,
}


def build_model(spec: ModelSpec) -> nn.Module:
    if spec.name not in ARCHITECTURES:
        from mtrec.errors import ConfigError

        raise ConfigError(f"config key training.model: unknown model {spec.name!r} "
                          f"(choose one of {', '.join(sorted(ARCHITECTURES))} or popularity)")
    return ARCHITECTURES[spec.name](spec)
