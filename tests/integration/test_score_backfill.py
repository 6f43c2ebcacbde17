"""Score stage and backfill on a small generated world with a real trained champion (DuckDB)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mtrec.config import load_config
from mtrec.data.generate import generate_into_warehouse
from mtrec.errors import StageError
from mtrec.warehouse import ensure_contract_tables, open_warehouse

END = dt.date(2024, 5, 12)
DAYS = [END - dt.timedelta(days=i) for i in range(4, -1, -1)]  # the 5 days a backfill covers
CONTENT = ["ds", "scenario", "user_id", "rank", "item_id", "score", "p_click", "p_like", "model_version"]


def _cfg(home, **scoring):
    return load_config(environ={}, overrides={
        "home": str(home), "training": {"epochs": 2, "train_days": 4, "batch_size": 512},
        "scoring": {"top_k": 5, **scoring}, "gate": {"min_positives": 20}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Ten days of data, features through END - 5, and a champion trained through END - 5 (forced: the gate is
    not what this module tests)."""
    from mtrec.steps import evaluate, features, train

    home = tmp_path_factory.mktemp("score") / "home"
    cfg = _cfg(home)
    generate_into_warehouse(cfg, users=250, items=120, days=12, end_date=END, seed=11, progress=False)
    first = DAYS[0] - dt.timedelta(days=1)
    features.run(cfg, first)
    trained = train.run(cfg, first, retrain="always")
    evaluate.run(cfg, first, force=True, reason="test fixture")
    return cfg, trained.version


def _read(cfg, ds: dt.date | None = None) -> pd.DataFrame:
    wh = open_warehouse(cfg)
    try:
        where = "WHERE ds = :d" if ds else ""
        df = wh.query_df(f"SELECT * FROM daily_recommendations {where} ORDER BY ds, scenario, user_id, rank",
                         {"d": ds} if ds else None)
    finally:
        wh.close()
    df["ds"] = pd.to_datetime(df["ds"]).dt.date
    return df


def _content(df: pd.DataFrame) -> pd.DataFrame:
    out = df[CONTENT].copy().reset_index(drop=True)
    out[["score", "p_click", "p_like"]] = out[["score", "p_click", "p_like"]].round(9)
    return out


def test_score_lists_are_complete_ranked_and_exclude_seen_items(world):
    from mtrec.features.training_set import build_scoring_table
    from mtrec.scoring.candidates import active_users
    from mtrec.steps import publish, score

    cfg, version = world
    ds = DAYS[0]
    res = score.run(cfg, ds, run_id="t-score")
    assert res.model_version == version
    # the model's forward is accounted apart from the rest of the stage's CPU time
    assert 0 < res.details["forward_cpu_seconds"] <= res.details["cpu_seconds"]
    publish.run(cfg, ds, run_id="t-score")
    df = _read(cfg, ds)
    wh = open_warehouse(cfg)
    try:
        for scenario, rows in res.rows.items():
            part = df[df["scenario"] == scenario]
            assert len(part) == rows > 0
            users = active_users(wh, cfg, ds, scenario)
            assert sorted(part["user_id"].unique()) == users
            assert (part.groupby("user_id")["rank"].apply(list) == pd.Series([[1, 2, 3, 4, 5]] * len(users),
                                                                              index=users)).all()
            assert (part.groupby("user_id")["item_id"].nunique() == 5).all()
            assert part.groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
            # items in the user's recent positive history are not recommended again
            seqs = build_scoring_table(cfg, wh, ds, pd.DataFrame({"user_id": users, "scenario": scenario,
                                                                  "item_id": ""})).sequences
            seen = {(u, i) for u, row in zip(users, seqs, strict=True) for i in row if i}
            assert seen, "the fixture should have users with history"
            assert not seen & set(zip(part["user_id"], part["item_id"], strict=True))
    finally:
        wh.close()
    assert (df["p_like"] <= df["p_click"] + 1e-6).all()
    w = {t.name: t.weight for t in cfg.tasks}
    np.testing.assert_allclose(df["score"], w["click"] * df["p_click"] + w["like"] * df["p_like"], rtol=1e-5)


@pytest.mark.parametrize("workers", [1, 3])
def test_chunking_does_not_change_the_lists(world, workers, monkeypatch):
    """Memory is bounded by the user chunk, the segment planned at once and the feature retrieval, and chunks are
    scored side by side; the result (rows and their order) must depend on none of them. Once the lanes rank,
    DuckDB's queries run on one thread; the warehouse's and the offline store's settings are restored after the
    stage."""
    import ibis

    from mtrec.features.training_set import set_offline_threads
    from mtrec.steps import score
    from mtrec.warehouse import open_warehouse

    cfg, _ = world
    ds = DAYS[1]
    big_cfg = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"workers": 1})})
    big = score.run(big_cfg, ds, run_id="t-big", scenarios=["home"])
    small_cfg = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={
        "batch_users": 16, "workers": workers, "retrieval_users": 40})})  # features fetched 40 users at a time
    monkeypatch.setattr("mtrec.scoring.rank.SEGMENT_USERS", 20)  # planned 20 at a time: two per retrieval
    offline = set_offline_threads(small_cfg, 3)  # (not this machine's default: a restore to it would show)
    wh = open_warehouse(small_cfg)
    try:
        wh.set_threads(3)
        calls = []
        set_threads = type(wh).set_threads
        monkeypatch.setattr(type(wh), "set_threads", lambda self, n: calls.append(n) or set_threads(self, n))
        small = score.run(small_cfg, ds, run_id=f"t-small-{workers}", scenarios=["home"], wh=wh)
        assert calls == [1, 3]
        assert wh.scalar("SELECT current_setting('threads')") == 3
        assert ibis.get_backend().con.execute("SELECT current_setting('threads')").fetchall()[0][0] == 3
    finally:
        wh.close()
        set_offline_threads(small_cfg, offline)
    a = pd.read_parquet(f"{big.scores_dir}/home.parquet")
    b = pd.read_parquet(f"{small.scores_dir}/home.parquet")
    assert a["user_id"].nunique() > 3 * 16  # several chunks
    pd.testing.assert_frame_equal(_content(a), _content(b))
    # the ids were staged from dictionaries: dictionary-encoded in the file, plain strings of the table's schema
    # when read
    from mtrec.scoring.rank import arrow_schema

    staged = pq.ParquetFile(f"{small.scores_dir}/home.parquet")
    assert staged.schema_arrow == arrow_schema(small_cfg) and staged.metadata.num_row_groups > 3
    for column in ("user_id", "item_id"):
        chunk = staged.metadata.row_group(1).column(staged.schema_arrow.get_field_index(column))
        assert chunk.path_in_schema == column and chunk.dictionary_page_offset is not None


def test_eager_scoring_gives_the_traced_lists(world):
    """`scoring.trace` (the default) only changes how the pair network runs, not the lists."""
    from mtrec.steps import score

    cfg, _ = world
    ds = DAYS[1]
    traced = score.run(cfg, ds, run_id="t-traced", scenarios=["home"])
    eager_cfg = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"trace": False})})
    eager = score.run(eager_cfg, ds, run_id="t-eager", scenarios=["home"])
    a = pd.read_parquet(f"{traced.scores_dir}/home.parquet")
    b = pd.read_parquet(f"{eager.scores_dir}/home.parquet")
    assert len(a) > 0
    pd.testing.assert_frame_equal(_content(a), _content(b))


def test_universes_of_several_scenarios_from_one_query_equal_each_scenario_alone(world):
    """The universes are built from one grouped query over the window's events: each scenario's items, order
    (most engaged, then most shown, then id), fresh items and smoothed rates are its own, as a per-scenario
    reference in pandas computes them."""
    from mtrec.data.raw import end_of_day
    from mtrec.scoring.candidates import scenario_universes, universe

    cfg, _ = world
    ds = DAYS[2]
    c, prior = cfg.scoring.candidates, cfg.features.popularity_prior
    wh = open_warehouse(cfg)
    try:
        together = scenario_universes(wh, cfg, ds, ["search", "home"])
        alone = [universe(wh, cfg, ds, s) for s in ("search", "home")]
        events = wh.query_df("SELECT * FROM events WHERE ds BETWEEN :a AND :b",
                             {"a": ds - dt.timedelta(days=c.popular_window_days - 1), "b": ds})
        items = wh.query_df("SELECT item_id, min(updated_at) AS first FROM items WHERE updated_at < :t "
                            "GROUP BY item_id", {"t": end_of_day(ds)})
    finally:
        wh.close()
    first = pd.to_datetime(items["first"], utc=True)
    fresh = items[first >= pd.Timestamp(end_of_day(ds)) - pd.Timedelta(days=c.fresh_days)].assign(first=first)
    fresh = fresh.sort_values(["first", "item_id"], ascending=[False, True])["item_id"].head(c.fresh).tolist()
    assert [u.scenario for u in together] == ["search", "home"]
    for uni, solo in zip(together, alone, strict=True):
        ev = events[(events["scenario"] == uni.scenario) & events["item_id"].notna()]
        stats = ev.groupby("item_id").agg(impressions=("item_id", "size"), engaged=("click", "sum"),
                                          pos=("click", "sum"), n=("click", "count")).reset_index()
        stats = stats.sort_values(["engaged", "impressions", "item_id"], ascending=[False, False, True])
        want = stats["item_id"].tolist() + [i for i in fresh if i not in set(stats["item_id"])]
        assert uni.items == want == solo.items
        assert uni.popular.tolist() == list(range(min(c.popular, len(stats))))
        assert [uni.items[i] for i in uni.fresh] == fresh and fresh  # fresh items exist on this day
        full = stats.set_index("item_id").reindex(want)
        base = stats["pos"].sum() / stats["n"].sum()
        rate = (full["pos"].fillna(0) + prior * base) / (full["n"].fillna(0) + prior)
        np.testing.assert_allclose(uni.rates["click"], rate.to_numpy(), rtol=1e-12)
        assert all(np.array_equal(uni.rates[t], solo.rates[t]) for t in cfg.task_names)


def test_fusion_weights_and_popularity_fallback(world):
    from mtrec.steps import score

    cfg, _ = world
    ds = DAYS[1]
    like_only = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(
        update={"fusion": {"search": {"click": 0.0, "like": 1.0}}})})
    res = score.run(like_only, ds, run_id="t-fusion", scenarios=["search"])
    df = pd.read_parquet(f"{res.scores_dir}/search.parquet")
    np.testing.assert_allclose(df["score"], df["p_like"], rtol=1e-6)
    # before the first champion existed, `as-of` has no model: the lists come from popularity and say so
    early = DAYS[0] - dt.timedelta(days=3)
    pop = score.run(cfg, early, run_id="t-asof", scenarios=["home"], model="as-of")
    assert pop.model_version == "popularity" and pop.warnings
    assert pop.details["forward_cpu_seconds"] == 0 < pop.details["pairs"]  # no model ran
    dfp = pd.read_parquet(f"{pop.scores_dir}/home.parquet")
    assert set(dfp["model_version"]) == {"popularity"} and len(dfp) > 0
    with pytest.raises(StageError, match="unknown scenario"):
        score.run(cfg, ds, run_id="t-bad", scenarios=["no_such_scenario"])


def test_backfill_equals_daily_runs_and_is_idempotent(world):
    from mtrec.backfill import backfill
    from mtrec.steps import features, publish, score

    cfg, version = world
    # each day alone, the way the daily DAG would score it
    for ds in DAYS:
        features.run(cfg, ds)
        score.run(cfg, ds, run_id=f"daily-{ds}")
        publish.run(cfg, ds, run_id=f"daily-{ds}")
    daily = _read(cfg)
    daily = daily[daily["ds"].isin(DAYS)]
    assert sorted(daily["ds"].unique()) == DAYS
    wh = open_warehouse(cfg)
    try:
        ensure_contract_tables(wh, cfg)
        wh.execute("DELETE FROM daily_recommendations WHERE ds BETWEEN :a AND :b", {"a": DAYS[0], "b": DAYS[-1]})
    finally:
        wh.close()

    first = backfill(cfg, DAYS[0], DAYS[-1], model="champion", progress=False)
    assert [r.ds for r in first] == DAYS and all(r.status == "success" for r in first)
    filled = _read(cfg)
    filled = filled[filled["ds"].isin(DAYS)]
    pd.testing.assert_frame_equal(_content(filled), _content(daily))
    assert set(filled["model_version"]) == {version}

    second = backfill(cfg, DAYS[0], DAYS[-1], model="champion", progress=False)
    assert all(r.status == "skipped" for r in second)
    again = _read(cfg)
    again = again[again["ds"].isin(DAYS)]
    pd.testing.assert_frame_equal(again.reset_index(drop=True), filled.reset_index(drop=True))  # run_id too

    forced = backfill(cfg, DAYS[-1], DAYS[-1], model="champion", force=True, progress=False)
    assert forced[0].status == "success"
    redone = _read(cfg, DAYS[-1])
    pd.testing.assert_frame_equal(_content(redone), _content(filled[filled["ds"] == DAYS[-1]]))


def test_a_failure_midway_leaves_no_partial_staging(world, monkeypatch):
    """A chunk that fails after others were written: the error surfaces, no staged file or marker is left."""
    import mtrec.scoring.rank as rank
    from mtrec.steps import score

    cfg, _ = world
    real = rank._score_chunk

    def flaky(cfg_, ds_, plan, scorer, rows, **kw):
        if rows.start >= 64:
            raise RuntimeError("scoring device lost")
        return real(cfg_, ds_, plan, scorer, rows, **kw)

    monkeypatch.setattr(rank, "_score_chunk", flaky)
    small = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"batch_users": 16})})
    with pytest.raises(RuntimeError, match="scoring device lost"):
        score.run(small, DAYS[2], run_id="t-flaky", scenarios=["home", "search"])
    staged = score.scores_dir(small, DAYS[2], "t-flaky")
    assert staged.is_dir()
    assert sorted(p.name for p in staged.iterdir() if not p.name.endswith(".lock")) == []


def test_a_failing_users_query_surfaces_after_the_universes_queries_end(world, monkeypatch):
    """The scenarios' universes are built in a thread beside the active users' query: when that query fails, the
    error surfaces once the universes' queries have ended (the caller then closes the warehouse connection)."""
    import threading
    import time

    import mtrec.scoring.candidates as C
    from mtrec.steps import score

    cfg, _ = world
    real, built = C.scenario_universes, []

    def slow(*args, **kwargs):
        time.sleep(0.3)
        unis = real(*args, **kwargs)
        built.extend(threading.current_thread().name for _ in unis)
        return unis

    def broken(*args, **kwargs):
        time.sleep(0.1)  # (the universes' thread is under way)
        raise RuntimeError("users query failed")

    monkeypatch.setattr(C, "scenario_universes", slow)
    monkeypatch.setattr(C, "active_users", broken)
    with pytest.raises(RuntimeError, match="users query failed"):
        score.run(cfg, DAYS[2], run_id="t-users", scenarios=["home", "search"])
    n = len(built)
    time.sleep(1.0)
    assert n == 2 and len(built) == n and all(name.startswith("mtrec-score-open") for name in built)


def test_a_failing_first_item_side_surfaces_its_own_error(world, monkeypatch):
    """The first scenario's item side is built ahead of its first plan, as soon as the universes and the model
    are ready: when it fails, that error is what the stage raises (and nothing is staged)."""
    import mtrec.scoring.rank as rank
    from mtrec.steps import score

    cfg, _ = world

    def broken(*args, **kwargs):
        raise RuntimeError("item features unreadable")

    monkeypatch.setattr(rank, "item_context", broken)
    with pytest.raises(RuntimeError, match="item features unreadable"):
        score.run(cfg, DAYS[2], run_id="t-items", scenarios=["home", "search"])
    staged = score.scores_dir(cfg, DAYS[2], "t-items")
    assert not staged.exists() or [p.name for p in staged.iterdir() if not p.name.endswith(".lock")] == []


def test_a_failing_model_load_surfaces_and_stops_the_waiting_planner(world, monkeypatch):
    """The first item side waits in the planner for the model the caller loads: when loading fails, the stage
    raises the loading error and no thread of the stage is left waiting."""
    import threading

    from mtrec.errors import ModelError
    from mtrec.steps import score

    cfg, _ = world

    def broken(*args, **kwargs):
        raise ModelError("model artifact unreadable", table="model_registry")

    monkeypatch.setattr(score, "make_scorer", broken)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            score.run(cfg, DAYS[2], run_id="t-model", scenarios=["home", "search"])
        except BaseException as e:  # noqa: BLE001 - checked below
            raised.append(e)

    stage = threading.Thread(target=run, name="stage")
    stage.start()
    stage.join(120)  # (a planner left waiting for the model would keep the stage from returning)
    assert not stage.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], ModelError) and "model artifact unreadable" in str(raised[0])
    assert [t.name for t in threading.enumerate() if t.name.startswith("mtrec-score")] == []
