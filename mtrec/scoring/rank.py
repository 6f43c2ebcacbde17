"""Batched top-K ranking: item side once per (item, scenario), user side once per (user, scenario), pairs in blocks.

Memory is bounded by the feature retrieval (`scoring.retrieval_users`), the segment of users planned at once
(SEGMENT_USERS; the stage plans up to two ahead of the one being ranked), the user chunk (`scoring.batch_users`,
times `scoring.workers` in flight) and the pair block, never by the number of users: rows are streamed to Parquet
as chunks finish.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.features.frame import ItemEmbeddings
from mtrec.features.store import Attributes
from mtrec.features.training_set import SequenceCodes, build_scoring_table
from mtrec.scoring.candidates import (
    SimilarCache,
    SimilarItems,
    Universe,
    candidate_grid,
    scenario_universes,
    similar_items,
)
from mtrec.training.encoding import to_device
from mtrec.warehouse import Warehouse

log = logging.getLogger(__name__)

PAIR_CHUNK = 2048
TAIL_SPLIT = 4  # the stage's last chunks are this many times smaller (the lanes finish together)
# planning a user (features, sequences, inputs) costs about a quarter of ranking it here: a segment at most this
# many times the previous is planned while the previous is ranked, with room for the planner's first plans, which
# take turns with the rest of the start-up (at 4, the lanes waited 0.2-0.4 s for the second segment here)
RAMP = 2
# chunks per lane in the stage's first segment: the lanes rank it while the second is planned, which waits for
# everyone's behaviour sequences (with one chunk each, the lanes waited ~0.3 s for it here)
HEAD_CHUNKS = 2
SEGMENT_USERS = 100_000  # users planned at once (their input tensors; up to 3 segments are held at a time)
WARM_UP_USERS = 64  # users of the first plan scored WARM_UP_RUNS times before or beside the lanes' first chunks
WARM_UP_RUNS = 2  # the trace is made on the first; TorchScript profiles the second, then optimizes the graph


class Scorer:
    """Probabilities on a grid of candidates: users of a chunk x their (padded) candidate items."""

    version: str
    tasks: list[str]
    # CPU seconds of the threads that ran the model on users (`user_side`, `grid_blocks`): the stage reports the
    # share of its cores' time that went to the forward (the rest: features, candidates, top-K, output). Counted
    # on the calling threads: with more than one torch thread per lane, torch's own workers are not included
    forward_cpu_seconds: float = 0.0

    def encode(self, table, sides: tuple[str, ...] = ("user", "item")) -> dict[str, torch.Tensor]:
        """Input tensors of a feature table's rows (CPU), of one side or both (the users' are sliced per chunk by
        `user_side`)."""
        raise NotImplementedError

    def user_side(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The user side of batch[rows] (row indices), once per (user, scenario)."""
        raise NotImplementedError

    def items(self, table, uni: Universe) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def grid(self, u: dict, i: dict, rows: torch.Tensor | slice, cand: torch.Tensor) -> dict[str, torch.Tensor]:
        """{task: [len(rows), C]} for users u[rows] (indices or a slice) and candidate item indices [len(rows), C]."""
        raise NotImplementedError

    def grid_blocks(self, u: dict, i: dict, cand: torch.Tensor,
                    blocks: list[tuple[slice, int]]) -> dict[str, torch.Tensor]:
        """{task: [U, W]} probabilities of users u (in `pair_blocks` order) x cand [U, W], scored block by block
        (rows, width); past a block's width the grid is not written (those pairs are not valid)."""
        probs: dict[str, torch.Tensor] = {}
        for rows, w in blocks:
            p = self.grid(u, i, rows, cand[rows, :w])
            for t in self.tasks:
                if t not in probs:
                    probs[t] = torch.empty(cand.shape, device=p[t].device)
                probs[t][rows, :w] = p[t]
        return probs


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


class PairGrid(torch.nn.Module):
    """The per-pair part of a ranker as one module: the item side gathered to the candidates, then the pairs
    scored (what `ModelScorer.grid` runs per block, so that it can be traced)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, u: dict[str, torch.Tensor], i: dict[str, torch.Tensor], scenario: torch.Tensor,
                cand: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        ig = {k: v.index_select(0, cand.reshape(-1)).view(cand.shape[0], cand.shape[1], *v.shape[1:])
              for k, v in i.items()}
        return model_grid(self.model, u, ig, scenario, text)


class BlockLoop(torch.nn.Module):
    """`Scorer.grid_blocks` in TorchScript around the traced pair grid: a whole chunk's blocks run in the
    interpreter, which holds no GIL, so a lane takes the GIL once per chunk instead of once per block."""

    def __init__(self, pairs, tasks: list[str]) -> None:
        super().__init__()
        self.pairs = pairs
        self.tasks = tasks

    def forward(self, u: dict[str, torch.Tensor], i: dict[str, torch.Tensor], scenario: torch.Tensor,
                cand: torch.Tensor, text: torch.Tensor, starts: list[int], stops: list[int],
                widths: list[int]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for t in self.tasks:
            out[t] = torch.empty(cand.shape, dtype=torch.float32, device=cand.device)
        for k in range(len(starts)):
            a, b, w = starts[k], stops[k], widths[k]
            ub: dict[str, torch.Tensor] = {}
            for key, v in u.items():
                ub[key] = v[a:b]
            p = self.pairs(ub, i, scenario[a:b], cand[a:b, :w], text)
            for t in self.tasks:
                out[t][a:b, :w] = p[t]
        return out


TRACE_TOLERANCE = 1e-5  # largest difference between traced and eager probabilities accepted


class ModelScorer(Scorer):
    """Scores with a trained ranker. With `trace` (models that declare themselves `traceable`), the pair grid
    runs as a TorchScript trace: the interpreter runs the whole block without holding the GIL, so lanes scoring
    side by side in threads do not wait for each other or for the planner (about 1.5x the pairs per second of
    eager lanes on 2 cores here). The trace is made on the first block and checked against eager execution on
    two shapes; if it differs, or cannot be made, scoring stays eager (with a warning)."""

    def __init__(self, artifact, version: str, device: torch.device, *, trace: bool = True) -> None:
        self.art, self.version, self.device = artifact.to(device), version, device
        self.tasks = artifact.tasks
        self._cpu_lock = threading.Lock()
        self._text: torch.Tensor | None = None
        self._pairs = PairGrid(self.art.model)
        self._traced = None  # the traced PairGrid once made
        self._loop = None  # BlockLoop around it, scripted
        self._trace = trace and bool(getattr(self.art.model, "traceable", False))
        self._trace_lock = threading.Lock()

    def encode(self, table, sides: tuple[str, ...] = ("user", "item")) -> dict[str, torch.Tensor]:
        tensors, text = self.art.encoder.transform(table, labels=False, sides=sides)
        if self._text is None or self._text.shape != text.shape:  # the same title matrix for every chunk
            self._text = text.to(self.device)
        return tensors

    def _count(self, started: float) -> None:
        with self._cpu_lock:
            self.forward_cpu_seconds += time.thread_time() - started

    @torch.no_grad()
    def user_side(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        started = time.thread_time()
        self.art.model.eval()
        b = to_device({k: v[rows] for k, v in batch.items()}, self.device)
        out = {**self.art.model.user_side(b, self._text), "_scenario": b["scenario"]}
        self._count(started)
        return out

    @torch.no_grad()
    def items(self, table, uni: Universe) -> dict[str, torch.Tensor]:
        self.art.model.eval()
        b = to_device(self.encode(table, sides=("item",)), self.device)
        return self.art.model.item_side(b, self._text)

    def _block(self, u, i, rows, cand) -> tuple:
        """PairGrid's arguments for the users u[rows] and their candidates."""
        return ({k: v[rows] for k, v in u.items() if not k.startswith("_")}, i, u["_scenario"][rows],
                cand.to(self.device), self._text)

    @torch.no_grad()
    def grid(self, u, i, rows, cand):
        args = self._block(u, i, rows, cand)
        if self._trace and self._traced is None:
            self._make_trace(args)
        return (self._traced if self._traced is not None else self._pairs)(*args)

    @torch.no_grad()
    def grid_blocks(self, u, i, cand, blocks):
        if self._trace and self._traced is None and blocks:  # (or being made by another lane: waits for it)
            rows, w = blocks[0]
            self._make_trace(self._block(u, i, rows, cand[rows, :w]))
        started = time.thread_time()
        if self._loop is None:
            out = super().grid_blocks(u, i, cand, blocks)
        else:
            out = self._loop({k: v for k, v in u.items() if not k.startswith("_")}, i, u["_scenario"],
                             cand.to(self.device), self._text, [r.start for r, _ in blocks],
                             [r.stop for r, _ in blocks], [w for _, w in blocks])
        self._count(started)
        return out

    def _make_trace(self, args) -> None:
        with self._trace_lock:  # the first blocks of several lanes arrive together: one trace
            if self._traced is not None or not self._trace:
                return
            self.art.model.eval()
            u, i, scenario, cand, text = args
            half = ({k: v[:max(1, len(v) // 2)] for k, v in u.items()}, i, scenario[:max(1, len(scenario) // 2)],
                    cand[:max(1, len(cand) // 2), :max(1, cand.shape[1] // 2)], text)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TorchScript's deprecation notice and tracer hints
                    traced = torch.jit.trace(self._pairs, args, strict=False, check_trace=False)
                    gap = max(float((a[t] - b[t]).abs().max()) if a[t].numel() else 0.0
                              for x in (args, half) for a, b in [(self._pairs(*x), traced(*x))] for t in a)
            except Exception as e:  # noqa: BLE001 - any failure to trace falls back to eager scoring
                log.warning("scoring %s eagerly: the pair grid could not be traced (%s)", self.version, e)
                self._trace = False
                return
            if gap > TRACE_TOLERANCE:
                log.warning("scoring %s eagerly: the traced pair grid differs from eager by %.2g", self.version, gap)
                self._trace = False
                return
            self._traced = traced
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TorchScript's deprecation notice
                    self._loop = torch.jit.script(BlockLoop(traced, list(self.tasks)))
            except Exception as e:  # noqa: BLE001 - blocks are then looped over in Python
                log.warning("scoring %s: the block loop could not be compiled (%s)", self.version, e)


class PopularityScorer(Scorer):
    """The fallback when there is no champion: each task's smoothed rate of the item in the scenario."""

    version = "popularity"

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks

    def encode(self, table, sides: tuple[str, ...] = ("user", "item")) -> dict[str, torch.Tensor]:
        return {}

    def user_side(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
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


def _constant(value, n: int, type_: pa.DataType) -> pa.Array:
    return pa.repeat(pa.scalar(value, type=type_), n)  # (a take of one value n times: a gather per row)


def _one_value(text: str, n: int) -> pa.DictionaryArray:
    """n rows of one text as a dictionary of one entry."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([text], type=pa.string()))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's CPU limit)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def scoring_workers(cfg: MtrecConfig) -> int:
    """Threads that score user chunks side by side (each runs torch on one thread); 0 = one per available CPU."""
    return cfg.scoring.workers or available_cpus()


@dataclass
class ItemContext:
    """What every user of a scenario shares: the universe, its item side and its similar-items table."""

    uni: Universe
    i_side: dict[str, torch.Tensor]
    similar: SimilarItems | None
    embeddings: ItemEmbeddings | None
    weights: dict[str, float]
    item_index: pd.Index
    item_ids: pa.Array
    chunk: int
    attributes: Attributes  # the attribute columns, read once per stage


@dataclass
class ScenarioPlan:
    """A segment of a scenario's users ready to rank: their input tensors (features from one Feast retrieval,
    joined once, and behaviour sequences; one row per user in `users` order), the universe index of each item
    of their sequences (-1: none), and what the scenario's users share."""

    items: ItemContext
    users: list[str]
    batch: dict[str, torch.Tensor]
    seen: torch.Tensor  # [n_users, sequence length]
    tail: int = 0  # the stage's last plan: lanes to even out at its end
    similar: torch.Tensor | None = None  # [n_users, k] their similar items when ranked at planning (SimilarCache)

    def chunks(self) -> list[slice]:
        """The rows of the user chunks ranked at once (`scoring.batch_users`). The stage's last plan ends in
        chunks TAIL_SPLIT times smaller over its last `tail` chunks' worth of users, so that the lanes finish
        together instead of one ranking a whole chunk alone."""
        n, size = len(self.users), self.items.chunk
        edge = max(0, n - self.tail * size)
        cuts = [*range(0, edge, size), *range(edge, n, max(1, size // TAIL_SPLIT))]
        return [slice(a, b) for a, b in zip(cuts, [*cuts[1:], n], strict=False)]  # (no users: no chunk)


def item_context(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, uni: Universe, scorer: Scorer, *, store,
                 features: pd.DataFrame, embeddings: ItemEmbeddings | None, attributes: Attributes,
                 previous: ItemContext | None = None) -> ItemContext:
    """The item side (once per (item, scenario)) and the similar-items table of a scenario, from the universe's
    item-side features already retrieved and the title embeddings and attribute columns already loaded.
    `previous`: the context of another scenario of the stage (its similarity table is reused when its universe
    holds the same items)."""
    item_table = build_scoring_table(cfg, wh, ds, pd.DataFrame(
        {"user_id": "", "scenario": uni.scenario, "item_id": uni.items}), sides=("item",), store=store,
        prefetched={"item": features}, embeddings=embeddings, attributes=attributes)
    similar = similar_items(cfg, embeddings, uni.items,
                            None if previous is None else (previous.uni.items, previous.similar))
    return ItemContext(uni=uni, i_side=scorer.items(item_table, uni), similar=similar,
                       embeddings=embeddings, weights=cfg.fusion_weights(uni.scenario),
                       item_index=pd.Index(uni.items), item_ids=pa.array(uni.items, type=pa.string()),
                       chunk=cfg.scoring.batch_users, attributes=attributes)


def universe_features(cfg: MtrecConfig, ds: dt.date, unis: list[Universe], store) -> pd.DataFrame | None:
    """The item-side features of every universe's items, in one Feast retrieval (each pays a fixed cost); None when
    no universe has an item."""
    from mtrec.features.training_set import retrieve_side

    ids = [i for uni in unis for i in uni.items]
    if not ids:
        return None
    return retrieve_side(cfg, ds, "item", ids, [uni.scenario for uni in unis for _ in uni.items], store=store)


def item_contexts(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, scenarios: list[str],
                  scorer: Scorer | Callable[[], Scorer], *, store=None, universes: list[Universe] | None = None,
                  shared: tuple[ItemEmbeddings | None, Attributes] | None = None,
                  features: pd.DataFrame | None = None) -> Iterator[tuple[Universe, ItemContext | None]]:
    """(universe, item context or None when it has no items) of each scenario in order, built as they are asked
    for. The universes come first (`universes`: already built, in the order of `scenarios`), then their items'
    features (`universe_features`; `features`: already retrieved) and the title embeddings, loaded once for all
    (`shared`: the title embeddings and the attribute columns, when already loaded). A scenario whose universe
    holds the same items as the one before reuses its similarity table. `scorer`, or a function giving it (called
    for the first item side: the model may still be loading while the features are retrieved)."""
    from mtrec.features import store as FS
    from mtrec.features.training_set import load_item_embeddings

    store = store or FS.feature_store(cfg)
    unis = universes if universes is not None else scenario_universes(wh, cfg, ds, scenarios)
    got = features if features is not None else universe_features(cfg, ds, unis, store)
    if got is None:
        yield from ((uni, None) for uni in unis)
        return
    embeddings, attributes = shared or (load_item_embeddings(cfg, wh), FS.attributes(cfg, wh))
    scorer = scorer if isinstance(scorer, Scorer) else scorer()
    previous = None
    for uni in unis:
        context = item_context(cfg, wh, ds, uni, scorer, store=store, embeddings=embeddings, attributes=attributes,
                               features=got[got["scenario"] == uni.scenario], previous=previous) if uni.items else None
        previous = context or previous
        yield uni, context


def plan_users(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, items: ItemContext, users: list[str], scorer: Scorer,
               sequences: SequenceCodes, *, store=None, features: pd.DataFrame | None = None,
               tail: int = 0, similar: SimilarCache | None = None) -> ScenarioPlan:
    """The user-side features of a segment of a scenario's users (`segments`: memory does not grow with the
    number of users). `sequences`: the behaviour sequences as of the end of ds, fetched once for the users of
    every scenario (a user's sequence does not depend on the scenario). `features`: the user-side retrieval of
    the segment's block (`retrieval_blocks`, `retrieve_side`) when already made. `tail`: see `ScenarioPlan.chunks`.
    `similar`: the stage's cache of users' similar items (ranked here, for the users it does not hold, instead of
    per chunk)."""
    from mtrec.features import store as FS
    from mtrec.features.training_set import retrieve_side

    store = store or FS.feature_store(cfg)
    scenario = items.uni.scenario
    if features is None:
        features = retrieve_side(cfg, ds, "user", users, scenario, store=store)
    user_rows = build_scoring_table(cfg, wh, ds, pd.DataFrame(
        {"user_id": users, "scenario": scenario, "item_id": ""}), sides=("user",),
        prefetched={"user": features}, store=store, embeddings=items.embeddings, sequences=False,
        attributes=items.attributes)
    seq = sequences.rows(users)  # codes: each distinct item is looked up once, not once per position
    seen = torch.from_numpy(items.item_index.get_indexer(pd.Index(seq.items))[seq.codes].astype(np.int64)) \
        if seq.codes.size else torch.full((len(users), 0), -1, dtype=torch.long)
    top = similar.top(items.similar, items.uni.items, users, seen) \
        if similar is not None and items.similar is not None else None
    return ScenarioPlan(items=items, users=users, batch=scorer.encode(replace(user_rows, sequences=seq), sides=("user",)),
                        seen=seen, tail=tail, similar=top)


def segments(cfg: MtrecConfig, users: list[str], *, first: bool = False) -> list[list[str]]:
    """A scenario's users in the segments planned at once (their input tensors: at most SEGMENT_USERS, and at
    most `scoring.retrieval_users`). `first`: the stage's first segment is only HEAD_CHUNKS chunks per lane, so
    that ranking starts sooner, and each next one at most RAMP times the previous, so that it
    is planned while the previous is ranked."""
    n = min(cfg.scoring.retrieval_users, SEGMENT_USERS)
    size = min(n, HEAD_CHUNKS * cfg.scoring.batch_users * scoring_workers(cfg)) if first else n
    out, start = [], 0
    while start < len(users):
        out.append(users[start:start + size])
        start += size
        size = min(n, size * RAMP)
    return out


def retrieval_blocks(cfg: MtrecConfig, parts: list[list[str]], *, first: bool = False) -> list[list[list[str]]]:
    """A scenario's segments (`segments`) grouped into the blocks whose users' features are retrieved from Feast
    at once: consecutive segments holding at most `scoring.retrieval_users` users together (each retrieval pays a
    fixed cost). `first`: the stage's first segment is a block of its own (it is fetched while the item side is
    built), and so is the second (fetched while the lanes rank the first, which is small: a larger block would
    keep them waiting)."""
    blocks: list[list[list[str]]] = []
    size = 0
    for i, part in enumerate(parts):
        if not blocks or (first and i in (1, 2)) or size + len(part) > cfg.scoring.retrieval_users:
            blocks.append([])
            size = 0
        blocks[-1].append(part)
        size += len(part)
    return blocks


def _chunk_inputs(cfg: MtrecConfig, plan: ScenarioPlan, scorer: Scorer, rows: slice) -> tuple:
    """(order, blocks, user side, cand, valid) of the plan's users `rows`, users in `pair_blocks` order."""
    it = plan.items
    cand, valid = candidate_grid(cfg, it.uni, plan.seen[rows], it.similar,
                                 None if plan.similar is None else plan.similar[rows])
    order, blocks = pair_blocks(valid)
    # the user side of the chunk's users in block order (the inputs are gathered, not the larger outputs)
    return order, blocks, scorer.user_side(plan.batch, order + rows.start), cand[order], valid[order]


def warm_up(cfg: MtrecConfig, plan: ScenarioPlan, scorer: Scorer) -> None:
    """Score the first WARM_UP_USERS users of a plan, WARM_UP_RUNS times, and drop the result, in a thread of its
    own (the score stage's: beside its first plan, on a plan of those users alone; `rank_plans`': while the lanes
    build their first chunks): the trace and TorchScript's profiling run are made on a few pairs (not on a whole
    chunk, while the other lane waits), so the lanes' first chunks run the optimized graph. A failure here is
    left to the lanes, which meet it again and raise it."""
    try:
        _, blocks, u_side, cand, _ = _chunk_inputs(cfg, plan, scorer, slice(0, min(WARM_UP_USERS, len(plan.users))))
        for _ in range(WARM_UP_RUNS):
            scorer.grid_blocks(u_side, plan.items.i_side, cand, blocks)
    except Exception as e:  # noqa: BLE001 - see above
        log.debug("scoring warm-up skipped: %s", e)


def _score_chunk(cfg: MtrecConfig, ds: dt.date, plan: ScenarioPlan, scorer: Scorer, rows: slice, *,
                 run_id: str, created_at: dt.datetime) -> tuple[int, int, pa.Table]:
    """(users, scored pairs, top-K rows) of the plan's users `rows` (a chunk)."""
    it = plan.items
    ids = plan.users[rows]
    order, blocks, u_side, cand, valid = _chunk_inputs(cfg, plan, scorer, rows)
    top = _score_grid(scorer, u_side, it.i_side, cand, valid, blocks, it.weights, cfg.scoring.top_k)
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order))
    top = (top[0][back], top[1][back], {t: v[back] for t, v in top[2].items()})  # back to user order
    table = _top_k(cfg, staging_schema(cfg), ds, it.uni.scenario, ids, it.item_ids, *top, version=scorer.version,
                   run_id=run_id, created_at=created_at)
    return len(ids), int(valid.sum()), table


def rank_plans(cfg: MtrecConfig, ds: dt.date, plans: Iterable[tuple[str, ScenarioPlan | None, bool]],
               scorer: Scorer, *, run_id: str, created_at: dt.datetime,
               on_chunk=None, warm: bool = True) -> Iterator[tuple[str, pa.Table | None]]:
    """Rank the users of each plan (scenario, plan of a segment of its users or None, last segment of the
    scenario?); yield (scenario, top-K rows of a chunk) in user order, then (scenario, None) once the scenario is
    complete. Uses no warehouse connection.

    Chunks are scored side by side by `scoring.workers` threads (torch, numpy and Arrow release the GIL in their
    kernels), across segment and scenario boundaries: the next plan's first chunks start while the last ones of
    the previous are still running. At most workers + 1 chunks are in memory. `warm`: `warm_up` on the first
    plan's first users beside the lanes' first chunks (off: the caller has warmed up the scorer)."""
    workers = scoring_workers(cfg)
    pending: deque = deque()  # (scenario, future of a chunk | None = end of the scenario), in output order

    def ready(final: bool) -> Iterator[tuple[str, pa.Table | None]]:
        while pending and (final or pending[0][1] is None or pending[0][1].done()
                           or sum(f is not None for _, f in pending) > workers):
            scenario, future = pending.popleft()
            if future is None:
                yield scenario, None
                continue
            n_users, n_pairs, table = future.result()
            if on_chunk:
                on_chunk(scenario, n_users, n_pairs)
            yield scenario, table

    warming = None
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mtrec-score") as pool:
            for scenario, plan, last in plans:
                if warm and warming is None and plan is not None and plan.users:
                    warming = threading.Thread(target=warm_up, args=(cfg, plan, scorer), name="mtrec-score-warm-up")
                    warming.start()
                for rows in plan.chunks() if plan is not None else ():
                    pending.append((scenario, pool.submit(_score_chunk, cfg, ds, plan, scorer, rows, run_id=run_id,
                                                          created_at=created_at)))
                    yield from ready(False)
                if last:
                    pending.append((scenario, None))
                yield from ready(False)
            yield from ready(True)
    finally:  # the warm-up ends with the stage (it is short: a few users' pairs)
        if warming is not None:
            warming.join()


def pair_blocks(valid: torch.Tensor) -> tuple[torch.Tensor, list[tuple[slice, int]]]:
    """Users in order of their candidate count (`order`), cut into blocks of about PAIR_CHUNK pairs (small enough
    for the expert activations to stay in cache): (order, [(rows of the ordered users, width)]). A block is only
    as wide as its own longest list, so padding costs next to nothing even when the lists differ in length."""
    counts = valid.sum(1)
    order = torch.argsort(counts, descending=True, stable=True)
    ordered = counts[order].tolist()
    blocks, r = [], 0
    while r < len(ordered):
        w = max(ordered[r], 1)
        n = max(1, PAIR_CHUNK // w)
        blocks.append((slice(r, min(r + n, len(ordered))), w))
        r += n
    return order, blocks


def _score_grid(scorer: Scorer, u_side: dict, i_side: dict, cand: torch.Tensor, valid: torch.Tensor,
                blocks: list[tuple[slice, int]], weights: dict[str, float],
                k: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Each user's top k candidates by fused score: (scores [U, k] (-inf past the user's candidates), universe
    indices [U, k], {task: probabilities [U, k]}). Users (u_side, cand, valid) are in the order of `pair_blocks`;
    the pairs are scored block by block into one grid of probabilities per task (on the scorer's device), then
    fused and ranked for the whole chunk at once."""
    n_users, width = cand.shape
    probs = scorer.grid_blocks(u_side, i_side, cand, blocks)
    kk = min(k, width)
    if probs:
        device = next(iter(probs.values())).device
        fused = torch.where(valid.to(device), _fuse(probs, weights), float("-inf"))
        s, j = torch.topk(fused, kk, dim=1)
        s, i, p = s.cpu(), cand.gather(1, j.cpu()), {t: probs[t].gather(1, j).cpu() for t in scorer.tasks}
        if kk == k:  # (the grid is at least k wide: the common case)
            return s, i, p
    top_s = torch.full((n_users, k), float("-inf"))
    top_i = torch.zeros((n_users, k), dtype=torch.long)
    top_p = {t: torch.zeros((n_users, k)) for t in scorer.tasks}
    if probs:
        top_s[:, :kk], top_i[:, :kk] = s, i
        for t in scorer.tasks:
            top_p[t][:, :kk] = p[t]
    return top_s, top_i, top_p


def _top_k(cfg: MtrecConfig, schema: pa.Schema, ds: dt.date, scenario: str, ids: list[str], item_ids: pa.Array,
           top_s: torch.Tensor, top_i: torch.Tensor, top_p: dict[str, torch.Tensor], *, version: str,
           run_id: str, created_at: dt.datetime) -> pa.Table:
    """The rows of daily_recommendations for a chunk from each user's top-k (padding dropped), ranks from 1, in
    `staging_schema` (the ids as dictionaries over the chunk's users and the universe: no id is copied per row)."""
    n_users, k = top_s.shape
    keep = np.isfinite(top_s.numpy()).ravel()
    # row-major positions of the rows kept (all of them when every user has k candidates: no gather then)
    kept = slice(None) if keep.all() else np.flatnonzero(keep)
    n = len(keep) if isinstance(kept, slice) else len(kept)

    def rows(x: torch.Tensor, dtype) -> pa.Array:
        return pa.array(x.numpy().ravel()[kept].astype(dtype, copy=False))

    columns = {
        "ds": _constant(ds, n, pa.date32()), "scenario": _one_value(scenario, n),
        "user_id": pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(n_users, dtype=np.int32), k)[kept]),
                                                  pa.array(ids, type=pa.string())),
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int64), n_users)[kept]),
        "item_id": pa.DictionaryArray.from_arrays(rows(top_i, np.int32), item_ids),
        "score": rows(top_s, np.float64)}
    for t in cfg.task_names:
        columns[S.prob_column(t)] = rows(top_p[t], np.float64) if t in top_p else pa.nulls(n, pa.float64())
    columns["model_version"] = _one_value(version, n)
    columns["run_id"] = _one_value(run_id, n)
    columns["created_at"] = _constant(pd.Timestamp(created_at).to_pydatetime(), n, pa.timestamp("us", tz="UTC"))
    return pa.table([columns[f.name].cast(f.type) for f in schema], schema=schema)


def arrow_schema(cfg: MtrecConfig) -> pa.Schema:
    types = {S.TEXT: pa.string(), S.DATE: pa.date32(), S.TIMESTAMP: pa.timestamp("us", tz="UTC"),
             S.DOUBLE: pa.float64(), S.BIGINT: pa.int64(), S.BOOLEAN: pa.bool_()}
    spec = S.recommendations_spec(cfg)
    return pa.schema([pa.field(c, types[t]) for c, t in spec.columns.items()])


# the ids, and the text columns of one value per chunk (a dictionary of one entry: the Parquet writer takes a
# dictionary as it is, where it would hash every row of a plain column; 0.4-0.6 -> 0.2 ms per column per chunk)
DICTIONARY_COLUMNS = ("user_id", "item_id", "scenario", "model_version", "run_id")


def staging_schema(cfg: MtrecConfig) -> pa.Schema:
    """`arrow_schema` with the ids and the constant text columns as dictionaries (int32 indices), as the ranked
    chunks hold them. Written to Parquet without the Arrow schema (`store_schema=False`), the columns are
    dictionary-encoded strings that read back as `arrow_schema`'s plain strings."""
    schema = arrow_schema(cfg)
    for c in DICTIONARY_COLUMNS:
        schema = schema.set(schema.get_field_index(c), pa.field(c, pa.dictionary(pa.int32(), pa.string())))
    return schema
