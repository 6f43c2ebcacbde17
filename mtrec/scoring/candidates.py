"""Who to score and what to rank, per scenario and logical date (all from data up to the end of ds).

Users: those with an impression in the scenario in the trailing `active_window_days` (or every known user).
Universe of items for a scenario: items shown in it over the trailing `popular_window_days` plus fresh items
(first seen within `fresh_days`). Candidates per user: the scenario's most engaged items, the fresh items, and
the items nearest by title embedding to the mean of the user's recent positives; items in the user's recent
positive history are excluded unless `exclude_seen` is off.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.data.raw import end_of_day
from mtrec.features.frame import ItemEmbeddings
from mtrec.features.training_set import root_tasks
from mtrec.warehouse import Warehouse, q


@dataclass
class Universe:
    """The items of one scenario that may be recommended, with the popularity statistics of the window."""

    scenario: str
    items: list[str]
    popular: np.ndarray  # indices into items, most engaged first
    fresh: np.ndarray  # indices into items
    rates: dict[str, np.ndarray]  # task -> smoothed rate per item (the popularity scorer)


def active_users(wh: Warehouse, cfg: MtrecConfig, ds: dt.date, scenario: str) -> list[str]:
    """Users to score in a scenario, sorted; anonymous impressions (no user id) have no one to serve."""
    if cfg.scoring.users == "all" and wh.table_exists(S.USERS):
        df = wh.query_df(f"SELECT DISTINCT user_id FROM {q(S.USERS)} WHERE updated_at < :t AND user_id <> '' "
                         f"ORDER BY user_id", {"t": end_of_day(ds)})
    else:
        lo = ds - dt.timedelta(days=cfg.scoring.active_window_days - 1)
        df = wh.query_df(f"SELECT DISTINCT user_id FROM {q(S.EVENTS)} WHERE scenario = :s AND ds BETWEEN :a AND :b "
                         f"AND user_id IS NOT NULL AND user_id <> '' ORDER BY user_id",
                         {"s": scenario, "a": lo, "b": ds})
    return df["user_id"].astype(str).tolist()


def universe(wh: Warehouse, cfg: MtrecConfig, ds: dt.date, scenario: str) -> Universe:
    c = cfg.scoring.candidates
    lo = ds - dt.timedelta(days=c.popular_window_days - 1)
    tasks = cfg.task_names
    sums = ", ".join(f"sum(CAST({q(t)} AS DOUBLE PRECISION)) AS {q('pos_' + t)}, count({q(t)}) AS {q('n_' + t)}"
                     for t in tasks)
    engaged = " + ".join(f"coalesce(CAST({q(t)} AS BIGINT), 0)" for t in root_tasks(cfg)) or "0"
    stats = wh.query_df(
        f"SELECT item_id, count(*) AS impressions, sum({engaged}) AS engaged, {sums} FROM {q(S.EVENTS)} "
        f"WHERE scenario = :s AND ds BETWEEN :a AND :b AND item_id IS NOT NULL GROUP BY item_id",
        {"s": scenario, "a": lo, "b": ds})
    fresh_ids: list[str] = []
    if wh.table_exists(S.ITEMS):
        fresh_lo = end_of_day(ds) - dt.timedelta(days=c.fresh_days)
        fresh = wh.query_df(
            f"SELECT item_id FROM {q(S.ITEMS)} WHERE updated_at < :t GROUP BY item_id "
            f"HAVING min(updated_at) >= :lo ORDER BY min(updated_at) DESC, item_id LIMIT :n",
            {"t": end_of_day(ds), "lo": fresh_lo, "n": int(c.fresh)})
        fresh_ids = fresh["item_id"].astype(str).tolist() if c.fresh else []
    stats["item_id"] = stats["item_id"].astype(str)
    stats = stats.sort_values(["engaged", "impressions", "item_id"], ascending=[False, False, True], kind="mergesort")
    items = stats["item_id"].tolist() + [i for i in fresh_ids if i not in set(stats["item_id"])]
    index = pd.Index(items)
    prior = cfg.features.popularity_prior
    rates: dict[str, np.ndarray] = {}
    full = stats.set_index("item_id").reindex(items)
    for t in tasks:
        pos = pd.to_numeric(full[f"pos_{t}"], errors="coerce").fillna(0.0).to_numpy(np.float64)
        n = pd.to_numeric(full[f"n_{t}"], errors="coerce").fillna(0.0).to_numpy(np.float64)
        base = pos.sum() / n.sum() if n.sum() else 0.0
        rates[t] = (pos + prior * base) / (n + prior)
    n_pop = min(c.popular, len(stats))
    return Universe(scenario=scenario, items=items, popular=np.arange(n_pop),
                    fresh=index.get_indexer(fresh_ids).astype(np.int64), rates=rates)


def item_vectors(embeddings: ItemEmbeddings | None, items: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm title embeddings of the universe [I, D] and a mask of items that have a real title."""
    if embeddings is None or not len(embeddings.item_ids):
        return torch.zeros(len(items), 1), torch.zeros(len(items), dtype=torch.bool)
    pos = embeddings.index_of(items)
    ok = pos >= 0
    out = np.zeros((len(items), embeddings.dim), np.float32)
    out[ok] = embeddings.vectors[pos[ok]]
    has = ok.copy()
    has[ok] &= ~embeddings.missing[pos[ok]]
    return torch.nn.functional.normalize(torch.from_numpy(out), dim=1), torch.from_numpy(has)


def candidate_mask(cfg: MtrecConfig, uni: Universe, sequences: np.ndarray, vectors: torch.Tensor,
                   has_vector: torch.Tensor) -> torch.Tensor:
    """Bool [U, I]: which universe items are candidates for each user of the chunk."""
    c = cfg.scoring.candidates
    n_users, n_items = len(sequences), len(uni.items)
    mask = torch.zeros((n_users, n_items), dtype=torch.bool)
    if n_items == 0:
        return mask
    common = np.concatenate([uni.popular, uni.fresh[uni.fresh >= 0]])
    mask[:, torch.from_numpy(common)] = True
    seq_idx = pd.Index(uni.items).get_indexer(pd.Index(sequences.ravel())).reshape(sequences.shape) \
        if sequences.size else np.full((n_users, 0), -1)
    seen = torch.from_numpy(seq_idx)
    if c.similar and bool(has_vector.any()) and seen.shape[1]:
        valid = seen >= 0
        gathered = vectors[seen.clamp_min(0)] * (valid & has_vector[seen.clamp_min(0)]).unsqueeze(-1)
        profile = torch.nn.functional.normalize(gathered.sum(1), dim=1)
        has_profile = gathered.abs().sum((1, 2)) > 0
        sims = profile @ vectors.T
        sims[:, ~has_vector] = -2.0
        k = min(c.similar, n_items)
        top = torch.topk(sims, k, dim=1).indices
        rows = torch.arange(n_users).unsqueeze(1).expand_as(top)
        pick = has_profile.unsqueeze(1).expand_as(top)
        mask[rows[pick], top[pick]] = True
    if c.exclude_seen and seen.shape[1]:
        rows = torch.arange(n_users).unsqueeze(1).expand_as(seen)
        ok = seen >= 0
        mask[rows[ok], seen[ok]] = False
    return mask
