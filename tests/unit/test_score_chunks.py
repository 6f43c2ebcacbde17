"""Segments and chunks of scoring plans: every user once, in order, at most `batch_users` per chunk; the stage's last
plan ends in smaller chunks so the lanes finish together. The warm-up scores a few users of the first plan."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtrec.config import load_config
from mtrec.scoring.candidates import Universe
from mtrec.scoring.rank import (
    TAIL_SPLIT,
    WARM_UP_RUNS,
    WARM_UP_USERS,
    ScenarioPlan,
    Scorer,
    retrieval_blocks,
    segments,
    warm_up,
)


def _chunks(n_users: int, size: int, tail: int) -> list[slice]:
    plan = ScenarioPlan(items=SimpleNamespace(chunk=size), users=[f"u{i}" for i in range(n_users)], batch={},
                        seen=torch.zeros((n_users, 0), dtype=torch.long), tail=tail)
    return plan.chunks()


@pytest.mark.parametrize("n_users, size, tail", [(0, 8, 2), (5, 8, 0), (5, 8, 2), (100, 8, 0), (100, 8, 2),
                                                 (101, 16, 3), (64, 16, 2), (3, 1, 2)])
def test_chunks_cover_every_user_once_in_order(n_users, size, tail):
    chunks = _chunks(n_users, size, tail)
    covered = [i for c in chunks for i in range(n_users)[c]]
    assert covered == list(range(n_users))
    assert all(0 < c.stop - c.start <= size for c in chunks)


def test_only_the_last_plan_ends_in_smaller_chunks():
    size = 16
    assert [c.stop - c.start for c in _chunks(100, size, 0)] == [16] * 6 + [4]
    sizes = [c.stop - c.start for c in _chunks(100, size, 2)]
    small = size // TAIL_SPLIT
    # whole chunks first, then the last two chunks' worth of users (32) in chunks of 4
    assert sizes == [16] * 4 + [4] + [small] * (2 * size // small)
    assert sum(sizes[-(2 * size // small):]) == 2 * size


class _Recorder(Scorer):
    """Records what the warm-up scores (users, candidate grid); fails when told to."""

    tasks = ["click"]

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.fail = fail

    def user_side(self, batch, rows):
        return {"rows": rows}

    def grid_blocks(self, u, i, cand, blocks):
        if self.fail:
            raise RuntimeError("no device")
        self.calls.append((len(u["rows"]), tuple(cand.shape)))
        return {}


def _plan(n_users: int) -> ScenarioPlan:
    uni = Universe(scenario="s", items=[f"it{i}" for i in range(40)], popular=np.arange(12),
                   fresh=np.array([], dtype=np.int64), rates={})
    return ScenarioPlan(items=SimpleNamespace(uni=uni, similar=None, i_side={}, chunk=16),
                        users=[f"u{i}" for i in range(n_users)], batch={},
                        seen=torch.full((n_users, 3), -1, dtype=torch.long))


@pytest.mark.parametrize("n_users", [200, 5])
def test_warm_up_scores_the_first_few_users_of_a_plan_twice(tmp_path, n_users):
    cfg = load_config(environ={}, overrides={"home": str(tmp_path)})
    scorer = _Recorder()
    warm_up(cfg, _plan(n_users), scorer)
    few = min(WARM_UP_USERS, n_users)
    assert scorer.calls == [(few, (few, 12))] * WARM_UP_RUNS


def test_a_failing_warm_up_is_left_to_the_lanes(tmp_path, caplog):
    cfg = load_config(environ={}, overrides={"home": str(tmp_path)})
    with caplog.at_level(logging.DEBUG, logger="mtrec.scoring.rank"):
        warm_up(cfg, _plan(10), _Recorder(fail=True))  # does not raise: the lanes meet the error and raise it
    assert "scoring warm-up skipped: no device" in caplog.text


@pytest.mark.parametrize("n_users, first, sizes", [
    (0, True, []), (20, True, [16, 4]), (100, False, [40, 40, 20]),
    # from HEAD_CHUNKS chunks per lane up to retrieval_users, RAMP times at a time
    (100, True, [16, 32, 40, 12]),
])
def test_segments_ramp_up_at_the_start_of_the_stage(tmp_path, n_users, first, sizes):
    cfg = load_config(environ={}, overrides={"home": str(tmp_path), "scoring": {
        "batch_users": 4, "workers": 2, "retrieval_users": 40}})
    users = [f"u{i}" for i in range(n_users)]
    got = segments(cfg, users, first=first)
    assert [len(s) for s in got] == sizes and [u for s in got for u in s] == users


@pytest.mark.parametrize("retrieval_users, first, blocks", [
    (40, False, [[8, 32], [40], [20]]),
    (80, False, [[8, 32, 40], [20]]),
    (80, True, [[8], [32], [40, 20]]),  # the stage's first two segments are fetched on their own
    (1000, True, [[8], [32], [40, 20]]),
    (1000, False, [[8, 32, 40, 20]]),
])
def test_retrieval_blocks_group_segments_up_to_retrieval_users(tmp_path, monkeypatch, retrieval_users, first,
                                                                blocks):
    """Segments (planned at once) stay at most SEGMENT_USERS; consecutive ones share one Feast retrieval up to
    `scoring.retrieval_users` users."""
    cfg = load_config(environ={}, overrides={"home": str(tmp_path), "scoring": {
        "batch_users": 4, "workers": 2, "retrieval_users": retrieval_users}})
    parts = [[f"u{i}"] * n for i, n in enumerate([8, 32, 40, 20])]
    got = retrieval_blocks(cfg, parts, first=first)
    assert [[len(p) for p in b] for b in got] == blocks and [p for b in got for p in b] == parts
    monkeypatch.setattr("mtrec.scoring.rank.SEGMENT_USERS", 30)
    assert max(len(s) for s in segments(cfg, [f"u{i}" for i in range(100)])) == 30


@pytest.mark.parametrize("short", [False, True])
def test_top_k_rows_drop_the_padding_of_users_with_fewer_than_k_candidates(tmp_path, short):
    """A chunk's rows: each user's top k in rank order, user and item ids mapped through the dictionaries; a user
    with fewer than k candidates (-inf past them) gets only their rows, and a user with none gets no row."""
    import datetime as dt

    import pyarrow as pa

    from mtrec.schema import prob_column
    from mtrec.scoring.rank import _top_k, arrow_schema, staging_schema

    cfg = load_config(environ={}, overrides={"home": str(tmp_path), "scoring": {"top_k": 3}})
    ids, items = ["a", "b", "c"], [f"it{i}" for i in range(9)]
    top_s = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.7, 0.6], [0.4, 0.3, 0.2]])
    top_i = torch.tensor([[4, 2, 7], [0, 1, 8], [3, 5, 6]])
    if short:
        top_s[0, 2] = top_s[2, :] = float("-inf")  # a has 2 candidates, c none
    top_p = {t: top_s.clamp(min=0) / (n + 1) for n, t in enumerate(cfg.task_names)}
    table = _top_k(cfg, staging_schema(cfg), dt.date(2024, 5, 1), "s", ids, pa.array(items),
                   top_s, top_i, top_p, version="v1", run_id="r1",
                   created_at=dt.datetime(2024, 5, 2, tzinfo=dt.UTC)).cast(arrow_schema(cfg)).to_pandas()
    keep = [(u, r) for u in range(3) for r in range(3) if bool(torch.isfinite(top_s[u, r]))]
    assert len(table) == (5 if short else 9)
    assert table["user_id"].tolist() == [ids[u] for u, _ in keep]
    assert table["rank"].tolist() == [r + 1 for _, r in keep]
    assert table["item_id"].tolist() == [items[int(top_i[u, r])] for u, r in keep]
    assert table["score"].tolist() == pytest.approx([float(top_s[u, r]) for u, r in keep])
    for t in cfg.task_names:
        assert table[prob_column(t)].tolist() == pytest.approx([float(top_p[t][u, r]) for u, r in keep])
    assert set(table["ds"].astype(str)) == {"2024-05-01"} and set(table["model_version"]) == {"v1"}


@pytest.mark.parametrize("width", [3, 8])
def test_score_grid_ranks_each_users_valid_candidates_by_fused_score(width):
    """Each user's top k by the fused score among their valid candidates, with their task probabilities; a grid
    narrower than k (or a user with fewer candidates) leaves -inf scores past them."""
    from mtrec.scoring.rank import _score_grid

    g = torch.Generator().manual_seed(width)
    n_users, k = 6, 5
    probs = {"a": torch.rand(n_users, width, generator=g), "b": torch.rand(n_users, width, generator=g)}
    cand = torch.randint(0, 50, (n_users, width), generator=g)
    valid = torch.ones(n_users, width, dtype=torch.bool)
    valid[1, 2:] = False  # a user with 2 candidates
    scorer = SimpleNamespace(tasks=["a", "b"], grid_blocks=lambda u, i, c, b: probs)
    top_s, top_i, top_p = _score_grid(scorer, {}, {}, cand, valid, [], {"a": 1.0, "b": 0.5}, k)
    assert tuple(top_s.shape) == tuple(top_i.shape) == (n_users, k)
    for u in range(n_users):
        fused = [(float(probs["a"][u, c] + 0.5 * probs["b"][u, c]), c) for c in range(width) if valid[u, c]]
        want = sorted(fused, reverse=True)[:k]
        n = len(want)
        assert top_s[u, :n].tolist() == pytest.approx([s for s, _ in want])
        assert bool(torch.isinf(top_s[u, n:]).all())
        assert top_i[u, :n].tolist() == [int(cand[u, c]) for _, c in want]
        assert top_p["b"][u, :n].tolist() == pytest.approx([float(probs["b"][u, c]) for _, c in want])
