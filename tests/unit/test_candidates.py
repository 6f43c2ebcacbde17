"""Candidate generation: the vectorized grid equals a per-user reference, on both similarity paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrec.config import load_config
from mtrec.features.frame import ItemEmbeddings
from mtrec.scoring import candidates as C


def _world(seed: int = 0, n_items: int = 300, n_users: int = 64, seq_len: int = 6):
    rng = np.random.default_rng(seed)
    items = [f"it{i}" for i in range(n_items)]
    # embeddings for most universe items plus some outside it; a few titles missing
    known = items[: n_items - 20] + [f"other{i}" for i in range(10)]
    vectors = rng.normal(size=(len(known), 12)).astype(np.float32)
    missing = rng.random(len(known)) < 0.1
    vectors[missing] = 0.0
    emb = ItemEmbeddings(item_ids=known, vectors=vectors, missing=missing)
    uni = C.Universe(scenario="s", items=items, popular=np.arange(15), fresh=np.array([n_items - 1, n_items - 2, 3]),
                     rates={})
    seen = rng.integers(-1, n_items, size=(n_users, seq_len))
    seen[:5] = -1  # users without history: no similar items
    seen[::2, 1] = -1  # a positive outside the universe, before others
    seen[::3, seq_len - 2:] = -1  # short histories (padding at the end)
    return uni, emb, torch.from_numpy(seen)


def _reference(cfg, uni, emb, seen: np.ndarray) -> list[list[int]]:
    c = cfg.scoring.candidates
    vec, has = C.item_vectors(emb, uni.items)
    vec, has = vec.numpy().astype(np.float64), has.numpy()
    k = min(c.similar, int(has.sum()))
    out = []
    for row in seen:
        cand = set(uni.popular.tolist()) | set(uni.fresh.tolist())
        prof = [s for s in row if s >= 0 and has[s]]
        if prof and k:
            p = vec[prof].sum(0)
            p /= np.linalg.norm(p)
            sims = np.where(has, vec @ p, -np.inf)
            cand |= set(np.argsort(-sims, kind="stable")[:k].tolist())
        if c.exclude_seen:
            cand -= set(row.tolist())
        out.append(sorted(cand))
    return out


def _grid_lists(cand: torch.Tensor, valid: torch.Tensor) -> list[list[int]]:
    return [cand[u][valid[u]].tolist() for u in range(cand.shape[0])]


@pytest.mark.parametrize("table_items", [10_000, 10])  # the item x item table, and the matrix product
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_candidate_grid_equals_the_per_user_reference(monkeypatch, table_items, exclude_seen):
    monkeypatch.setattr(C, "SIMILARITY_TABLE_ITEMS", table_items)
    cfg = load_config(environ={}, overrides={"scoring": {"candidates": {"similar": 20,
                                                                        "exclude_seen": exclude_seen}}})
    uni, emb, seen = _world()
    sim = C.similar_items(cfg, emb, uni.items)
    assert (sim.table is None) == (table_items < len(uni.items))
    cand, valid = C.candidate_grid(cfg, uni, seen, sim)
    got, want = _grid_lists(cand, valid), _reference(cfg, uni, emb, seen.numpy())
    assert got == want
    # padding: valid entries first, then index 0
    assert bool((cand[~valid] == 0).all())
    assert bool((valid.long().diff(dim=1) <= 0).all())
    if exclude_seen:
        assert all(not (set(g) & set(r.tolist())) for g, r in zip(got, seen, strict=True))
    common = sorted(set(uni.popular.tolist()) | set(uni.fresh.tolist()))
    assert got[0] == common  # no history: the popular and fresh items only
    assert sum(len(g) > len(common) for g in got) > len(got) // 2  # the similar source adds items


def test_candidate_grid_without_users_or_without_candidates_is_one_column_of_padding():
    cfg = load_config(environ={})
    uni, emb, seen = _world(seed=2)
    cand, valid = C.candidate_grid(cfg, uni, seen[:0], C.similar_items(cfg, emb, uni.items))
    assert tuple(cand.shape) == (0, 1) and tuple(valid.shape) == (0, 1)
    nothing = C.Universe(scenario="s", items=uni.items, popular=np.arange(0), fresh=np.array([], dtype=np.int64),
                         rates={})
    cand, valid = C.candidate_grid(cfg, nothing, seen, None)
    assert tuple(cand.shape) == (len(seen), 1) and not bool(valid.any()) and bool((cand == 0).all())
    assert cand.dtype == torch.long and valid.dtype == torch.bool


def test_no_titles_or_no_similar_source_gives_popular_and_fresh_only():
    cfg = load_config(environ={}, overrides={"scoring": {"candidates": {"similar": 0}}})
    uni, emb, seen = _world(seed=1)
    assert C.similar_items(cfg, emb, uni.items) is None
    none = ItemEmbeddings(item_ids=[], vectors=np.zeros((0, 4), np.float32), missing=np.zeros(0, bool))
    assert C.similar_items(load_config(environ={}), none, uni.items) is None
    cand, valid = C.candidate_grid(cfg, uni, seen, None)
    common = set(uni.popular.tolist()) | set(uni.fresh.tolist())
    for row, s in zip(_grid_lists(cand, valid), seen, strict=True):
        assert row == sorted(common - set(s.tolist()))


@pytest.mark.parametrize("n", [2003, 4096, 50])
def test_top_indices_equals_torch_topk(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(37, n, generator=g)
    x[:, ::7] = float("-inf")  # items without a title
    got = C._top_indices(x, 30).sort(1).values
    want = torch.topk(x, 30, dim=1).indices.sort(1).values
    assert torch.equal(got, want)


@pytest.mark.parametrize("n", [2003, 50])
def test_top_indices_with_ties_takes_k_of_the_largest(n):
    """Ties at a row's k-th value (duplicate titles give equal similarities): k distinct columns whose values are
    the k largest."""
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 40, (37, n), generator=g).float()  # many equal values
    x[3] = 1.0  # a row of one value
    got = C._top_indices(x, 30)
    assert all(len(set(row)) == 30 for row in got.tolist())
    assert torch.equal(x.gather(1, got).sort(1).values, torch.topk(x, 30, dim=1).values.sort(1).values)


def test_users_with_one_positive_item_take_its_own_list(monkeypatch):
    """One titled item (alone, repeated, or beside untitled and out-of-universe positives) gives the item's own
    precomputed list; it must be what the matrix path (no table, no per-item lists) ranks for that user."""
    cfg = load_config(environ={}, overrides={"scoring": {"candidates": {"similar": 20}}})
    uni, emb, _ = _world(seed=3)
    has = C.item_vectors(emb, uni.items)[1]
    titled = has.nonzero().squeeze(1)
    untitled = int((~has).nonzero()[0])
    a, b = int(titled[0]), int(titled[5])
    seen = torch.tensor([[a, -1, -1], [a, a, -1], [-1, a, untitled], [a, b, -1], [-1, -1, -1]])
    with_table = C.similar_items(cfg, emb, uni.items)
    assert with_table.item_top is not None
    monkeypatch.setattr(C, "SIMILARITY_TABLE_ITEMS", 10)
    without = C.similar_items(cfg, emb, uni.items)
    assert without.table is None and without.item_top is None
    got, want = with_table.top(seen).sort(1).values, without.top(seen).sort(1).values
    assert torch.equal(got, want)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])  # the same item: the same list
    assert not torch.equal(got[0], got[3])  # two items: their bag
    assert bool((got[4] == -1).all())  # no profile


def test_similar_cache_ranks_a_user_once_across_scenarios_with_the_same_universe():
    """A user met again in a scenario whose universe holds the same items (in another order) takes the similar
    items ranked before, mapped to that universe's indices; users not met yet are ranked; a universe with other
    items starts afresh. The lists are the ranked ones either way."""
    cfg = load_config(environ={}, overrides={"scoring": {"candidates": {"similar": 20}}})
    uni, emb, seen = _world(seed=3)
    users = [f"u{i}" for i in range(len(seen))]
    perm = np.random.default_rng(1).permutation(len(uni.items))  # the second scenario's order of the same items
    items2 = [uni.items[p] for p in perm]
    where = np.empty(len(perm), np.int64)
    where[perm] = np.arange(len(perm))
    seen2 = torch.from_numpy(np.where(seen.numpy() >= 0, where[seen.numpy().clip(0)], -1))
    fewer = uni.items[:-1]  # a third scenario without one of the items
    seen3 = torch.where(seen == len(fewer), -1, seen)

    def as_ids(top, items):
        return [{items[j] for j in row if j >= 0} for row in top.tolist()]

    cache, ranked = C.SimilarCache(users[:-5]), []  # (the last 5 users are not among the stage's)
    sims = [C.similar_items(cfg, emb, its) for its in (uni.items, items2, fewer)]
    for sim in sims:
        top = sim.top
        sim.top = lambda s, top=top: ranked.append(len(s)) or top(s)
    first = cache.top(sims[0], uni.items, users[:40], seen[:40])
    assert ranked == [40] and as_ids(first, uni.items) == as_ids(sims[0].top(seen[:40]), uni.items)
    ranked.clear()
    again = cache.top(sims[1], items2, users[20:], seen2[20:])
    assert ranked == [len(users) - 40]  # only the users not met before
    ranked.clear()
    assert torch.equal(cache.top(sims[1], items2, users[20:], seen2[20:]), again)
    assert ranked == [5]  # the users outside the stage's are ranked again
    assert as_ids(again, items2) == as_ids(sims[1].top(seen2[20:]), items2)
    assert as_ids(again[:20], items2) == as_ids(first[20:], uni.items)
    assert sum(len(r) > 0 for r in as_ids(again, items2)) > len(again) // 2  # real lists, not all empty
    ranked.clear()
    third = cache.top(sims[2], fewer, users, seen3)
    assert ranked == [len(users)] and as_ids(third, fewer) == as_ids(sims[2].top(seen3), fewer)
    # no positives kept (sequence length 0): no profile, no list
    assert bool((C.SimilarCache(users).top(sims[0], uni.items, users, seen[:, :0]) == -1).all())
    assert bool((C.SimilarCache([]).top(sims[0], uni.items, users[:3], seen[:3]) == sims[0].top(seen[:3])).all())


@pytest.mark.parametrize("table_items", [10_000, 10])  # the item x item table, and the matrix product
def test_similar_items_of_the_same_universe_in_another_order_are_reordered_not_recomputed(monkeypatch,
                                                                                        table_items):
    """A scenario whose universe holds the previous one's items in another order takes its similarity table
    reordered: the same nearest items for every user as a table computed for that order; a universe with other
    items is computed afresh."""
    monkeypatch.setattr(C, "SIMILARITY_TABLE_ITEMS", table_items)
    cfg = load_config(environ={}, overrides={"scoring": {"candidates": {"similar": 20}}})
    uni, emb, seen = _world(seed=4)
    first = C.similar_items(cfg, emb, uni.items)
    perm = np.random.default_rng(2).permutation(len(uni.items))
    items2 = [uni.items[p] for p in perm]
    where = np.empty(len(perm), np.int64)
    where[perm] = np.arange(len(perm))
    seen2 = torch.from_numpy(np.where(seen.numpy() >= 0, where[seen.numpy().clip(0)], -1))
    built = []
    real = C.item_vectors
    monkeypatch.setattr(C, "item_vectors", lambda *a: built.append(1) or real(*a))
    reused = C.similar_items(cfg, emb, items2, (uni.items, first))
    assert not built  # reordered, not computed
    fresh = C.similar_items(cfg, emb, items2)
    assert built == [1]
    assert torch.equal(reused.has_vector, fresh.has_vector) and reused.k == fresh.k
    assert torch.equal(reused.top(seen2).sort(1).values, fresh.top(seen2).sort(1).values)
    if fresh.table is not None:
        titled = fresh.has_vector  # (an untitled item's row is all ties; it is never a profile)
        assert torch.equal(reused.item_top[titled].sort(1).values, fresh.item_top[titled].sort(1).values)
        assert torch.allclose(reused.table, fresh.table, atol=1e-6)
    other = C.similar_items(cfg, emb, uni.items[:-1], (uni.items, first))  # not the same items: computed
    assert built == [1, 1] and other is not None
