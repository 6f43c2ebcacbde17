"""Batched top-K ranking of one scenario: item side once, user side once per (user, scenario), pairs in chunks.

Memory is bounded by the user chunk (`scoring.batch_users`, shrunk when the item universe is large) and the
pair chunk, never by the number of users: rows are streamed to a Parquet file as chunks finish.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.features.training_set import build_scoring_table
from mtrec.scoring.candidates import Universe, candidate_mask, item_vectors
from mtrec.training.encoding import to_device
from mtrec.warehouse import Warehouse

log = logging.getLogger(__name__)

PAIR_CHUNK = 65_536
MASK_CELLS = 20_000_000  # user chunk x universe cells kept in memory at once


class Scorer:
    """Probabilities on a grid of candidates: users of a chunk x their (padded) candidate items."""

    version: str
    tasks: list[str]

    def users(self, table) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def items(self, table, uni: Universe) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def grid(self, u: dict, i: dict, rows: slice, cand: torch.Tensor) -> dict[str, torch.Tensor]:
        """{task: [len(rows), C]} for users u[rows] and candidate item indices cand [len(rows), C]."""
        raise NotImplementedError


def model_grid(model, u: dict, i: dict, scenario: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """u per user [B, ...], i per candidate [B, C, ...]. Models with a `grid` method score the grid without
    copying user-side tensors per candidate (msmt); others get the rows expanded and call `pair`."""
    if hasattr(model, "grid"):
        return model.grid(u, i, scenario, text)
    B, C = next(iter(i.values())).shape[:2]
    ue = {k: v.unsqueeze(1).expand(B, C, *v.shape[1:]).reshape(B * C, *v.shape[1:]) for k, v in u.items()}
    ie = {k: v.reshape(B * C, *v.shape[2:]) for k, v in i.items()}
    out = model.pair(ue, ie, scenario.repeat_interleave(C), text)
    return {t: p.view(B, C) for t, p in out.items()}


class ModelScorer(Scorer):
    def __init__(self, artifact, version: str, device: torch.device) -> None:
        self.art, self.version, self.device = artifact.to(device), version, device
        self.tasks = artifact.tasks
        self._text: torch.Tensor | None = None

    def _encode(self, table) -> dict[str, torch.Tensor]:
        tensors, text = self.art.encoder.transform(table, labels=False)
        self._text = text.to(self.device)
        return to_device(tensors, self.device)

    @torch.no_grad()
    def users(self, table) -> dict[str, torch.Tensor]:
        self.art.model.eval()
        b = self._encode(table)
        return {**self.art.model.user_side(b, self._text), "_scenario": b["scenario"]}

    @torch.no_grad()
    def items(self, table, uni: Universe) -> dict[str, torch.Tensor]:
        self.art.model.eval()
        b = self._encode(table)
        return self.art.model.item_side(b, self._text)

    @torch.no_grad()
    def grid(self, u, i, rows, cand):
        ug = {k: v[rows] for k, v in u.items() if not k.startswith("_")}
        c = cand.to(self.device)
        ig = {k: v[c] for k, v in i.items()}
        return model_grid(self.art.model, ug, ig, u["_scenario"][rows], self._text)


class PopularityScorer(Scorer):
    """The fallback when there is no champion: each task's smoothed rate of the item in the scenario."""

    version = "popularity"

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks

    def users(self, table) -> dict[str, torch.Tensor]:
        return {}

    def items(self, table, uni: Universe) -> dict[str, torch.Tensor]:
        return {t: torch.from_numpy(uni.rates[t].astype(np.float32)) for t in self.tasks}

    def grid(self, u, i, rows, cand):
        return {t: i[t][cand] for t in self.tasks}


def _fuse(probs: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    out = None
    for t, w in weights.items():
        if t in probs and w:
            out = probs[t].float() * w if out is None else out + probs[t].float() * w
    if out is None:
        raise ValueError("no fusion weight matches a task of the model")
    return out


def rank_scenario(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, uni: Universe, users: list[str],
                  scorer: Scorer, *, run_id: str, created_at: dt.datetime, on_chunk=None) -> Iterator[pd.DataFrame]:
    """Yield the top-K rows of every user of the scenario, one user chunk at a time."""
    k = cfg.scoring.top_k
    weights = cfg.fusion_weights(uni.scenario)
    n_items = len(uni.items)
    if not users or not n_items:
        return
    from mtrec.features import store as FS
    from mtrec.features.training_set import load_item_embeddings, retrieve_side

    store = FS.feature_store(cfg)
    embeddings = load_item_embeddings(cfg, wh)  # once per scenario, shared by every chunk
    item_table = build_scoring_table(cfg, wh, ds, pd.DataFrame(
        {"user_id": "", "scenario": uni.scenario, "item_id": uni.items}), sides=("item",), store=store,
        embeddings=embeddings)
    # one retrieval of the user side for every user of the scenario; chunks only build their sequences
    user_features = retrieve_side(cfg, ds, "user", users, uni.scenario, store=store)
    i_side = scorer.items(item_table, uni)
    vectors, has_vector = item_vectors(embeddings, uni.items)
    chunk = max(16, min(cfg.scoring.batch_users, MASK_CELLS // max(n_items, 1)))
    for start in range(0, len(users), chunk):
        ids = users[start:start + chunk]
        user_table = build_scoring_table(cfg, wh, ds, pd.DataFrame(
            {"user_id": ids, "scenario": uni.scenario, "item_id": ""}), sides=("user",),
            prefetched={"user": user_features}, store=store, embeddings=embeddings)
        u_side = scorer.users(user_table)
        seq = user_table.sequences if user_table.sequences is not None else np.zeros((len(ids), 0), dtype=object)
        mask = candidate_mask(cfg, uni, seq, vectors, has_vector)
        # padded candidate grid [U, C]: each user's candidates first (item order), then -1
        counts = mask.sum(1)
        width = max(int(counts.max()) if len(counts) else 0, 1)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
        cand = torch.where(valid, order, torch.zeros_like(order))
        scores = torch.full((len(ids), width), float("-inf"))
        probs = {t: torch.zeros((len(ids), width)) for t in scorer.tasks}
        step = max(1, PAIR_CHUNK // width)
        for r in range(0, len(ids), step):
            rows = slice(r, min(r + step, len(ids)))
            p = scorer.grid(u_side, i_side, rows, cand[rows])
            for t in scorer.tasks:
                probs[t][rows] = p[t].float().cpu()
            fused = _fuse(p, weights).cpu()
            scores[rows] = torch.where(valid[rows], fused, scores[rows])
        kk = min(k, width)
        top_s, top_c = torch.topk(scores, kk, dim=1)
        keep = torch.isfinite(top_s)
        rows_u = torch.arange(len(ids)).unsqueeze(1).expand_as(top_c)[keep]
        cols = top_c[keep]
        ranks = (torch.arange(kk) + 1).unsqueeze(0).expand_as(top_c)[keep]
        frame = pd.DataFrame({
            "ds": ds, "scenario": uni.scenario, "user_id": np.asarray(ids, dtype=object)[rows_u.numpy()],
            "rank": ranks.numpy().astype(np.int64),
            "item_id": np.asarray(uni.items, dtype=object)[cand[rows_u, cols].numpy()],
            "score": top_s[keep].numpy().astype(np.float64)})
        for t in cfg.task_names:
            frame[S.prob_column(t)] = probs[t][rows_u, cols].numpy().astype(np.float64) if t in probs else np.nan
        frame["model_version"] = scorer.version
        frame["run_id"] = run_id
        frame["created_at"] = pd.Timestamp(created_at)
        if on_chunk:
            on_chunk(len(ids), int(counts.sum()))
        yield frame


def arrow_schema(cfg: MtrecConfig) -> pa.Schema:
    types = {S.TEXT: pa.string(), S.DATE: pa.date32(), S.TIMESTAMP: pa.timestamp("us", tz="UTC"),
             S.DOUBLE: pa.float64(), S.BIGINT: pa.int64(), S.BOOLEAN: pa.bool_()}
    spec = S.recommendations_spec(cfg)
    return pa.schema([pa.field(c, types[t]) for c, t in spec.columns.items()])
