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
from mtrec.features.frame import ItemEmbeddings, distinct_index
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
    """The universe of one scenario (`scenario_universes`)."""
    return scenario_universes(wh, cfg, ds, [scenario])[0]


def scenario_universes(wh: Warehouse, cfg: MtrecConfig, ds: dt.date, scenarios: list[str]) -> list[Universe]:
    """The universe of each scenario, in order, from one pass over the window's events and one over the items
    (the fresh items are the same for every scenario)."""
    c = cfg.scoring.candidates
    lo = ds - dt.timedelta(days=c.popular_window_days - 1)
    tasks = cfg.task_names
    sums = ", ".join(f"sum(CAST({q(t)} AS DOUBLE PRECISION)) AS {q('pos_' + t)}, count({q(t)}) AS {q('n_' + t)}"
                     for t in tasks)
    engaged = " + ".join(f"coalesce(CAST({q(t)} AS BIGINT), 0)" for t in root_tasks(cfg)) or "0"
    wanted = {f"s{n}": scenario for n, scenario in enumerate(dict.fromkeys(scenarios))}
    all_stats = wh.query_df(
        f"SELECT scenario, item_id, count(*) AS impressions, sum({engaged}) AS engaged, {sums} FROM {q(S.EVENTS)} "
        f"WHERE scenario IN ({', '.join(':' + k for k in wanted)}) AND ds BETWEEN :a AND :b "
        f"AND item_id IS NOT NULL GROUP BY scenario, item_id", {**wanted, "a": lo, "b": ds}) if wanted else None
    fresh_ids: list[str] = []
    if wh.table_exists(S.ITEMS) and c.fresh and wanted:
        fresh_lo = end_of_day(ds) - dt.timedelta(days=c.fresh_days)
        fresh = wh.query_df(
            f"SELECT item_id FROM {q(S.ITEMS)} WHERE updated_at < :t GROUP BY item_id "
            f"HAVING min(updated_at) >= :lo ORDER BY min(updated_at) DESC, item_id LIMIT :n",
            {"t": end_of_day(ds), "lo": fresh_lo, "n": int(c.fresh)})
        fresh_ids = fresh["item_id"].astype(str).tolist()
    prior = cfg.features.popularity_prior
    out = []
    for scenario in scenarios:
        stats = all_stats[all_stats["scenario"] == scenario].drop(columns="scenario")
        stats["item_id"] = stats["item_id"].astype(str)
        stats = stats.sort_values(["engaged", "impressions", "item_id"], ascending=[False, False, True],
                                  kind="mergesort")
        shown = set(stats["item_id"])
        items = stats["item_id"].tolist() + [i for i in fresh_ids if i not in shown]
        index = pd.Index(items)
        rates: dict[str, np.ndarray] = {}
        full = stats.set_index("item_id").reindex(items)
        for t in tasks:
            pos = pd.to_numeric(full[f"pos_{t}"], errors="coerce").fillna(0.0).to_numpy(np.float64)
            n = pd.to_numeric(full[f"n_{t}"], errors="coerce").fillna(0.0).to_numpy(np.float64)
            base = pos.sum() / n.sum() if n.sum() else 0.0
            rates[t] = (pos + prior * base) / (n + prior)
        n_pop = min(c.popular, len(stats))
        out.append(Universe(scenario=scenario, items=items, popular=np.arange(n_pop),
                            fresh=index.get_indexer(fresh_ids).astype(np.int64), rates=rates))
    return out


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


SIMILARITY_TABLE_ITEMS = 4096  # up to this universe size the item x item cosine table is precomputed
SIMILARITY_ROWS = 256  # users whose similarity rows are ranked at a time
TOP_GROUP = 8  # items per group in `_top_indices`


class SimilarItems:
    """The universe items nearest by title embedding to the mean of a user's recent positives.

    The score of item j for a user with positives s_1..s_n is cos(sum_k v_{s_k}, v_j), ranked per user, so the
    norm of the sum does not matter and the score is sum_k <v_{s_k}, v_j>. For a universe of up to
    SIMILARITY_TABLE_ITEMS items the item x item table is computed once per scenario (items without a title and
    the padding to whole groups of `_top_indices` hold -inf, so no mask is applied per user) and a user's scores
    are an embedding bag over its rows (L x I additions per user instead of D x I multiply-adds); above that, the
    summed vectors are multiplied by the universe matrix. With the table, each item's own nearest items are
    ranked once too: a user whose titled positives are all one item (a fifth of the generated data's users) takes
    that item's list (the same items as the bag, up to ties).
    """

    def __init__(self, vectors: torch.Tensor, has_vector: torch.Tensor, k: int) -> None:
        self.has_vector = has_vector
        self.k = min(k, int(has_vector.sum()))
        self.vectors = vectors * has_vector.unsqueeze(1)
        self.table = None
        n = len(has_vector)
        if n <= SIMILARITY_TABLE_ITEMS:
            self.table = torch.full((n, -(-n // TOP_GROUP) * TOP_GROUP), float("-inf"))
            self.table[:, :n] = torch.where(has_vector, self.vectors @ self.vectors.T, float("-inf"))
        self.item_top = _top_indices(self.table, self.k) if self.table is not None and self.k else None

    def reordered(self, perm: torch.Tensor) -> SimilarItems:
        """The same similarities over the same items in another order (item n of the new universe is item
        perm[n] of this one): the table and the items' own lists permuted, not computed again."""
        out = SimilarItems.__new__(SimilarItems)
        out.has_vector, out.k, out.vectors = self.has_vector[perm], self.k, self.vectors[perm]
        out.table = out.item_top = None
        if self.table is not None:
            n = len(perm)
            out.table = torch.full_like(self.table, float("-inf"))  # (the same padding to whole groups)
            out.table[:, :n] = self.table[perm][:, perm]
        if self.item_top is not None:
            new = torch.empty_like(perm)
            new[perm] = torch.arange(len(perm))
            out.item_top = new[self.item_top[perm]]
        return out

    def top(self, seen: torch.Tensor) -> torch.Tensor:
        """seen [U, L] universe indices (-1: none) -> [U, k] nearest items (in no particular order), -1 for users
        without a profile."""
        top = torch.full((len(seen), self.k), -1, dtype=torch.long)
        if not seen.shape[1]:  # no positives kept (sequence length 0): no profile
            return top
        ok = seen >= 0
        ok[ok.clone()] = self.has_vector[seen[ok]]
        rest = ok.any(1)  # users without a titled positive have no profile
        if self.item_top is not None:
            hi = torch.where(ok, seen, -1).amax(1)
            single = rest & (hi == torch.where(ok, seen, len(self.has_vector)).amin(1))  # one item, maybe repeated
            top[single] = self.item_top[hi[single]]
            rest &= ~single
        users = rest.nonzero().squeeze(1)
        for r in range(0, len(users), SIMILARITY_ROWS):  # a block of users' scores stays in cache for top-k
            rows = users[r:r + SIMILARITY_ROWS]
            # bags of the positives only (sequences are mostly padding): offsets into the flat list
            bag_ok = ok[rows]
            flat = seen[rows][bag_ok]
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), bag_ok.sum(1).cumsum(0)[:-1]])
            if self.table is not None:
                sims = torch.nn.functional.embedding_bag(flat, self.table, offsets, mode="sum")
            else:
                sims = torch.nn.functional.embedding_bag(flat, self.vectors, offsets, mode="sum") @ self.vectors.T
                sims[:, ~self.has_vector] = float("-inf")
            top[rows] = _top_indices(sims, self.k)
        return top


class SimilarCache:
    """Users' similar items kept across the scenarios of a stage. A user's positives and the title embeddings do
    not depend on the scenario: when two scenarios' universes hold the same items (in whatever order), a user's
    nearest items are the same, so a user met in an earlier scenario is looked up, not ranked again (most users
    are active in several scenarios). `users`: every user the stage may ask about (one hash table for all the
    lookups, one row each); a user outside them is ranked every time. Entries are positions in the sorted
    universe; a scenario with another universe starts the cache afresh. Used from one thread (the score stage's
    planner)."""

    def __init__(self, users: list[str] | pd.Index) -> None:
        self.users = distinct_index(users)
        self.items: np.ndarray | None = None  # the sorted universe the entries are over
        self.codes = np.zeros((0, 0), np.int32)  # [users, k] positions in `items` (-1: none) of ranked users
        self.ranked = np.zeros(0, bool)  # [users]: the row holds the user's list

    def top(self, similar: SimilarItems, items: list[str], users: list[str] | pd.Index,
            seen: torch.Tensor) -> torch.Tensor:
        """`similar.top(seen)` of `users` (distinct; `seen` their rows), for the universe `items`."""
        ids = np.asarray(items, dtype=object)
        order = np.argsort(ids, kind="stable")  # sorted position -> universe index
        ranked = ids[order]
        if self.items is None or self.codes.shape[1] != similar.k or not np.array_equal(ranked, self.items):
            self.items = ranked
            # (zeros: pages the allocator maps untouched, written only for the users ranked; a row is read only
            # once ranked, or, for a row not ranked, its value is replaced)
            self.codes = np.zeros((len(self.users), similar.k), np.int32)
            self.ranked = np.zeros(len(self.users), bool)
        pos = self.users.get_indexer(users)
        row = np.maximum(pos, 0)
        hit = (pos >= 0) & self.ranked[row] if len(self.users) else np.zeros(len(pos), bool)
        out = torch.from_numpy(np.append(order, -1)[self.codes[np.where(hit, row, 0)]]) if hit.any() else \
            torch.full((len(pos), similar.k), -1, dtype=torch.long)
        miss = np.flatnonzero(~hit)
        if len(miss):
            got = similar.top(seen[torch.from_numpy(miss)])
            out[torch.from_numpy(miss)] = got
            to_sorted = np.full(len(order) + 1, -1, np.int32)  # (universe index -1, none, stays -1)
            to_sorted[order] = np.arange(len(order), dtype=np.int32)
            kept = pos[miss] >= 0
            self.codes[pos[miss][kept]] = to_sorted[got.numpy()[kept]]
            self.ranked[pos[miss][kept]] = True
        return out


def _top_indices(x: torch.Tensor, k: int, group: int = TOP_GROUP) -> torch.Tensor:
    """Indices of the k largest values of each row of x (CPU), in no particular order: the same set as
    torch.topk (up to ties), about 3x faster on rows of 2000 here. The columns are split into `group` strided
    slices; a row's top k lie in the k columns of the slice-wise maxima (`amax` over the slices: contiguous,
    vectorized) that are largest, so only those k * group values are ranked (`_largest`)."""
    n_rows, n = x.shape
    n_groups = -(-n // group)
    if n_groups <= 2 * k:
        return torch.from_numpy(_largest(x.numpy(), k))
    if n % group:
        x = torch.cat([x, x.new_full((n_rows, n_groups * group - n), float("-inf"))], 1)
    maxima = x.view(n_rows, group, n_groups).amax(1)  # column j * n_groups + c belongs to group c
    cols = (_largest(maxima.numpy(), k)[:, :, None] + np.arange(group) * n_groups).reshape(n_rows, -1)
    return torch.from_numpy(np.take_along_axis(cols, _largest(np.take_along_axis(x.numpy(), cols, 1), k), 1))


def _largest(v: np.ndarray, k: int) -> np.ndarray:
    """Column positions of the k largest values of each row of v [R, n] (k <= n), in column order. Each row's
    k-th largest value is found by numpy's introselect on the values alone (`partition`: about 3x quicker than
    `argpartition` on short rows here); the values at or above it are the k largest unless a row has ties at
    its k-th value, in which case the rows are ranked by `argpartition` (one of the tied values is taken)."""
    n_rows, n = v.shape
    kth = np.partition(v, n - k, axis=1)[:, n - k:n - k + 1]
    flat = np.flatnonzero(v >= kth)  # row-major: each row's positions in column order
    if flat.size == n_rows * k:  # (every row has at least k: exactly k each)
        return (flat % n).reshape(n_rows, k)
    return np.argpartition(v, n - k, axis=1)[:, n - k:]


def similar_items(cfg: MtrecConfig, embeddings: ItemEmbeddings | None, items: list[str],
                  previous: tuple[list[str], SimilarItems | None] | None = None) -> SimilarItems | None:
    """Built once per scenario; None when the similar-items source is off or no universe item has a title.
    `previous`: (universe, its similar items) of another scenario, with the same embeddings: when it holds the
    same items (in whatever order), its table is reordered instead of computed again."""
    if previous is not None and previous[1] is not None and len(previous[0]) == len(items):
        perm = pd.Index(previous[0]).get_indexer(items)
        if (perm >= 0).all() and len(set(items)) == len(items):
            return previous[1].reordered(torch.from_numpy(perm.astype(np.int64)))
    vectors, has_vector = item_vectors(embeddings, items)
    if not cfg.scoring.candidates.similar or not bool(has_vector.any()):
        return None
    return SimilarItems(vectors, has_vector, cfg.scoring.candidates.similar)


def candidate_grid(cfg: MtrecConfig, uni: Universe, seen: torch.Tensor, similar: SimilarItems | None,
                   top: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's candidates as a padded grid: (cand [U, W] universe indices, valid [U, W]).

    seen [U, L]: universe index of each item of the user's recent positives (-1: none or not in the universe).
    top: the users' similar items when already ranked (`similar.top(seen)`, or a `SimilarCache`'s).
    Candidates = the scenario's popular and fresh items + the user's similar items, minus seen items when
    `exclude_seen`; each row lists its candidates in universe order, then padding (index 0, valid False).

    One sort per row of keys over the row's candidates and seen items (2 * item + 1 a candidate, 2 * item a seen
    item, past every item: none): a candidate is kept unless the key before it is the same item, seen or already
    a candidate (a similar item that is also a popular or fresh one). No [U, universe] table is built per chunk.
    """
    n_users, n_items = seen.shape[0], len(uni.items)
    common = torch.from_numpy(np.unique(np.concatenate([uni.popular, uni.fresh[uni.fresh >= 0]])).astype(np.int64))
    none = 2 * n_items + 2  # even: never a candidate
    parts = [(2 * common + 1).to(torch.int32).unsqueeze(0).expand(n_users, -1)]
    if similar is not None and seen.shape[1] and similar.k and n_items:
        top = similar.top(seen) if top is None else top  # distinct per row; -1: no profile
        parts.append(torch.where(top >= 0, 2 * top + 1, none).to(torch.int32))
    if cfg.scoring.candidates.exclude_seen and seen.shape[1] and n_items:
        parts.append(torch.where(seen >= 0, 2 * seen, none).to(torch.int32))
    # (numpy's sort of short integer rows: an order of magnitude quicker than torch's here)
    keys = np.sort(torch.cat(parts, 1).numpy(), axis=1)
    before = np.full_like(keys, -1)
    before[:, 1:] = keys[:, :-1]
    keep = ((keys & 1) == 1) & (before < keys - 1)
    counts = keep.sum(1)
    width = max(int(counts.max()) if keys.size else 0, 1)
    valid = np.arange(width) < counts[:, None]
    cand = np.zeros((n_users, width), np.int64)
    cand[valid] = keys[keep] >> 1  # row by row, in order: each row's kept items to its first counts[row] slots
    return torch.from_numpy(cand), torch.from_numpy(valid)
