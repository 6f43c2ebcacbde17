"""Features stage: point-in-time correctness (leakage tests that can fail), sequences, idempotent reruns, Redis."""

from __future__ import annotations

import datetime as dt
import secrets

import numpy as np
import pandas as pd
import pytest

from mtrec.config import load_config
from mtrec.data.generate import generate_into_warehouse
from mtrec.data.raw import load_frames
from mtrec.features import aggregates as A
from mtrec.features import store as FS
from mtrec.features.offline import InstantRetrievalJob
from mtrec.features.training_set import (
    _retrieve,
    build_scoring_table,
    build_training_set,
    sequence_codes,
    sequences_for,
)
from mtrec.steps import features
from mtrec.warehouse import open_warehouse

END = dt.date(2024, 6, 8)
DAY = END - dt.timedelta(days=1)  # the day whose impressions we inspect


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    home = tmp_path_factory.mktemp("features") / "home"
    cfg = load_config(environ={}, overrides={"home": str(home)})
    generate_into_warehouse(cfg, users=200, items=80, days=6, end_date=END, seed=5, progress=False)
    wh = open_warehouse(cfg)
    # Plant a future attribute value: user u0000001 changes country at noon of DAY.
    load_frames(wh, cfg, {"users": pd.DataFrame({
        "user_id": ["u0000001"], "updated_at": [pd.Timestamp(DAY, tz="UTC") + pd.Timedelta(hours=12)],
        "age_bucket": ["18-24"], "country": ["PLANTED"], "device": ["web"], "tenure_days": [1.0]})})
    wh.close()
    result = features.run(cfg, END)
    return cfg, result


def _tables(cfg) -> dict[str, pd.DataFrame]:
    wh = open_warehouse(cfg)
    try:
        return {t: wh.query_df(f"SELECT * FROM {t} ORDER BY 1, 2, 3") for t in
                (A.ITEM_DAILY, A.USER_DAILY, A.ITEM_SCENARIO_FEATURES, A.USER_SCENARIO_FEATURES)}
    finally:
        wh.close()


def test_rerun_leaves_aggregates_unchanged_and_embeds_nothing(built):
    cfg, first = built
    assert first.items_embedded > 0
    before = _tables(cfg)
    again = features.run(cfg, END)
    assert again.items_embedded == 0
    for name, df in _tables(cfg).items():
        pd.testing.assert_frame_equal(df, before[name], obj=name)


def test_planted_future_attribute_never_reaches_earlier_impressions(built):
    cfg, _ = built
    wh = open_warehouse(cfg)
    try:
        table = build_training_set(cfg, wh, DAY, DAY)
        scoring = build_scoring_table(cfg, wh, DAY, pd.DataFrame(
            {"user_id": ["u0000001"], "scenario": ["home"], "item_id": ["i0000001"]}))
    finally:
        wh.close()
    assert "PLANTED" not in set(table.frame["u_country"].dropna())
    assert scoring.frame["u_country"].iloc[0] == "PLANTED"  # visible once the day is over


def test_feast_join_agrees_with_merge_asof_and_sees_only_previous_days(built):
    cfg, _ = built
    wh = open_warehouse(cfg)
    try:
        table = build_training_set(cfg, wh, DAY, DAY)
        snaps = wh.query_df(f"SELECT * FROM {A.ITEM_SCENARIO_FEATURES}")
        events = wh.query_df("SELECT item_id, scenario, ds FROM events")
    finally:
        wh.close()
    rows = table.frame.sample(300, random_state=0).sort_values("feature_time")
    snaps["feature_timestamp"] = pd.to_datetime(snaps["feature_timestamp"], utc=True).astype("datetime64[ns, UTC]")
    rows["feature_time"] = rows["feature_time"].astype("datetime64[ns, UTC]")
    expected = pd.merge_asof(
        rows[["event_id", "item_id", "scenario", "feature_time"]], snaps.sort_values("feature_timestamp"),
        left_on="feature_time", right_on="feature_timestamp", by=["item_id", "scenario"],
        tolerance=pd.Timedelta(days=1), allow_exact_matches=True)
    got = rows.set_index("event_id")["is_impressions_7d"]
    want = expected.set_index("event_id")["is_impressions_7d"].fillna(0.0)
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), check_names=False)
    # and the 1-day count equals the raw impressions of the previous day, never of the impression's own day
    events["ds"] = pd.to_datetime(events["ds"]).dt.date
    prev = events[events["ds"] == DAY - dt.timedelta(days=1)].groupby(["item_id", "scenario"]).size()
    keys = list(zip(rows["item_id"], rows["scenario"], strict=True))
    counts = np.array([prev.get(k, 0) for k in keys], dtype=float)
    np.testing.assert_array_equal(rows["is_impressions_1d"].to_numpy(), counts)


def test_sequences_hold_only_engagements_before_the_day(built):
    cfg, _ = built
    wh = open_warehouse(cfg)
    try:
        table = build_training_set(cfg, wh, DAY, DAY)
        ev = wh.query_df("SELECT user_id, item_id, event_timestamp, event_id, click FROM events WHERE click = 1")
    finally:
        wh.close()
    ev["event_timestamp"] = pd.to_datetime(ev["event_timestamp"], utc=True)
    cutoff = pd.Timestamp(DAY, tz="UTC")
    n = cfg.features.sequence_length
    frame = table.frame
    checked = 0
    for i in np.flatnonzero(frame["user_id"].isin(ev["user_id"]).to_numpy())[:200]:
        user = frame["user_id"].iat[i]
        hist = ev[(ev["user_id"] == user) & (ev["event_timestamp"] < cutoff)].sort_values(
            ["event_timestamp", "event_id"], ascending=False)["item_id"].tolist()[:n]
        got = [x for x in table.sequences[i] if x]
        assert got == hist
        checked += 1
    assert checked > 20
    # an impression's own engagement (on DAY) never appears in its sequence unless engaged earlier
    own = frame[(frame["click"] == 1)]
    for i in own.index[:100]:
        earlier = ev[(ev["user_id"] == frame.at[i, "user_id"]) & (ev["event_timestamp"] < cutoff)]["item_id"]
        if frame.at[i, "item_id"] not in set(earlier):
            assert frame.at[i, "item_id"] not in set(table.sequences[i])


def test_coded_sequences_of_many_users_equal_the_item_id_sequences(built):
    """Scoring's coded sequences (users fetched in batches, positives coded as they arrive) decode to exactly what
    `sequences_for` gives each user at that cut-off: order, padding, users without history, unknown and repeated
    users, items first met in a later batch."""
    cfg, _ = built
    cutoff = pd.Timestamp(END, tz="UTC")
    wh = open_warehouse(cfg)
    try:
        users = wh.query_df("SELECT DISTINCT user_id FROM events ORDER BY user_id")["user_id"].tolist()
        asked = users + ["nobody", users[0]]
        coded = sequence_codes(wh, cfg, asked, cutoff, batch=37)
        expected = sequences_for(wh, cfg, pd.DataFrame({"user_id": asked, "cutoff": cutoff}))
    finally:
        wh.close()
    got = coded.rows(asked).decode()
    assert got.shape == expected.shape == (len(asked), cfg.features.sequence_length)
    assert (expected != "").sum(1).max() > 1 and (expected[-2] == "").all()  # real histories, and one empty
    np.testing.assert_array_equal(got, expected)


def test_embeddings_stay_a_matrix_keyed_by_item(built):
    cfg, _ = built
    wh = open_warehouse(cfg)
    try:
        table = build_training_set(cfg, wh, DAY, DAY)
    finally:
        wh.close()
    emb = table.item_embeddings
    assert emb is not None and emb.vectors.shape[1] == 384
    assert not any("embedding" in c for c in table.frame.columns)
    assert (emb.index_of(table.frame["item_id"]) >= 0).all()


def test_materializes_into_redis(tmp_path, redis_url):
    project = f"mtrec_test_{secrets.token_hex(4)}"
    cfg = load_config(environ={}, overrides={
        "home": str(tmp_path / "home"), "online_store": {"type": "redis", "redis_url": redis_url},
        "features": {"feast_project": project}})
    generate_into_warehouse(cfg, users=60, items=30, days=3, end_date=END, seed=1, progress=False)
    features.run(cfg, END)
    store = FS.feature_store(cfg)
    wh = open_warehouse(cfg)
    try:
        top = wh.query_df(f"SELECT item_id, scenario, is_impressions_1d FROM {A.ITEM_SCENARIO_FEATURES} "
                          "WHERE ds = :d ORDER BY is_impressions_1d DESC LIMIT 1", {"d": END})
    finally:
        wh.close()
    got = store.get_online_features(
        features=[f"{FS.ITEM_STATS}:is_impressions_1d"],
        entity_rows=[{"item_id": top["item_id"][0], "scenario": top["scenario"][0]}]).to_dict()
    assert got["is_impressions_1d"][0] == pytest.approx(top["is_impressions_1d"][0])
    import redis

    client = redis.Redis.from_url(redis_url)
    assert any(project.encode() in k for k in client.scan_iter(count=1000)) or client.dbsize() > 0
    store.teardown()


def test_feature_repo_files_describe_the_same_objects(built):
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg, _ = built
    repo = Path(__file__).resolve().parents[2] / "feature_repo"
    env = {**os.environ, "MTREC_HOME": str(cfg.home)}
    env.pop("MTREC_CONFIG", None)
    feast = Path(sys.executable).parent / "feast"
    out = subprocess.run([str(feast), "feature-services", "list"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mtrec_ranker_v1" in out.stdout and "item_scenario_stats:is_click_rate_7d" in out.stdout


def test_postgres_offline_store_gives_the_same_training_set_as_duckdb(tmp_path, postgres_url):
    """With a PostgreSQL warehouse, Feast's offline store is that PostgreSQL (PostgreSQLSource over the warehouse
    tables) and the point-in-time training set is the same as with the embedded DuckDB default."""
    frames = {}
    for kind, url in (("duckdb", None), ("postgres", postgres_url)):
        over = {"home": str(tmp_path / kind)}
        if url:
            over["warehouse_url"] = url
        cfg = load_config(environ={}, overrides=over)
        generate_into_warehouse(cfg, users=120, items=50, days=4, end_date=END, seed=9, progress=False)
        features.run(cfg, END)
        store = FS.feature_store(cfg)
        source = store.get_feature_view(FS.ITEM_STATS).batch_source
        if kind == "postgres":
            assert store.config.offline_store.type == "postgres"
            assert type(source).__name__ == "PostgreSQLSource" and "item_scenario_features" in source.get_table_query_string()
        else:
            assert store.config.offline_store.type == FS.SNAPSHOT_STORE and type(source).__name__ == "FileSource"
        wh = open_warehouse(cfg)
        try:
            table = build_training_set(cfg, wh, DAY, END)
        finally:
            wh.close()
        frames[kind] = table.frame.sort_values("event_id").reset_index(drop=True)
    a, b = frames["duckdb"], frames["postgres"]
    assert len(a) == len(b) > 0
    cols = [c for c in a.columns if c not in ("event_timestamp", "feature_time", "ds")]
    assert a["us_impressions_7d"].gt(0).any() and a["is_click_rate_7d"].notna().any()
    pd.testing.assert_frame_equal(a[cols], b[cols], check_dtype=False, check_like=True)


def _user_scenarios(cfg) -> pd.DataFrame:
    """Every (user_id, scenario) of the generated events: entity rows of a user-side retrieval."""
    wh = open_warehouse(cfg)
    try:
        return wh.query_df("SELECT DISTINCT user_id, scenario FROM events ORDER BY 1, 2")
    finally:
        wh.close()


def test_snapshot_store_reads_only_the_days_it_can_match_and_equals_feasts_duckdb_store(built, monkeypatch):
    """The embedded offline store prunes the daily snapshot files to the entity timestamps' window (minus the
    TTL); what it retrieves is what Feast's own DuckDB store retrieves from every file."""
    from mtrec.features import offline

    cfg, _ = built
    store = FS.feature_store(cfg)
    assert store.config.offline_store.type == FS.SNAPSHOT_STORE
    plain = FS.feature_store(cfg, offline_store={"type": "duckdb"})
    read: list[list[str]] = []
    pick = offline.snapshot_files
    monkeypatch.setattr(offline, "snapshot_files", lambda *a: read.append(pick(*a)) or read[-1])
    users = _user_scenarios(cfg)
    refs = FS.service_features(store, "user")
    for ts, days in ((pd.Timestamp(END, tz="UTC") + pd.Timedelta(days=1), {END}),
                     (pd.Timestamp(DAY, tz="UTC"), {DAY - dt.timedelta(days=1), DAY})):
        entity = users.assign(event_timestamp=ts)
        read.clear()
        got, want = (s.get_historical_features(entity_df=entity, features=refs).to_df()
                     .sort_values(["user_id", "scenario"]).reset_index(drop=True) for s in (store, plain))
        pd.testing.assert_frame_equal(got, want)
        assert got["us_impressions_7d"].notna().any()
        files = [f for r in read if r for f in r]
        assert {dt.date.fromisoformat(f.split("ds=")[1][:10]) for f in files} == days


def test_one_instant_retrieval_keys_on_the_join_keys_and_equals_feasts_join(built, monkeypatch):
    """Entity rows that all share one timestamp (batch scoring) are joined on their keys alone, without Feast's
    general point-in-time join; the rows are Feast's own DuckDB store's, including repeated entity rows, unknown
    keys, an attribute version planted after the instant (not seen) and before it (seen), full feature names
    and the item side. Rows with two timestamps still go through Feast's join."""
    import feast.infra.offline_stores.ibis as feast_ibis

    cfg, _ = built
    store, plain = FS.feature_store(cfg), FS.feature_store(cfg, offline_store={"type": "duckdb"})
    general = []
    join = feast_ibis.point_in_time_join
    monkeypatch.setattr(feast_ibis, "point_in_time_join", lambda *a, **k: general.append(1) or join(*a, **k))
    users = _user_scenarios(cfg)
    rows = pd.concat([users, users.head(5), pd.DataFrame({"user_id": ["nobody", "u0000001"],
                                                          "scenario": [users["scenario"].iat[0], "nowhere"]})])
    items = pd.DataFrame({"item_id": [f"i{n:07d}" for n in range(90)], "scenario": users["scenario"].iat[0]})
    planted = pd.Timestamp(DAY, tz="UTC") + pd.Timedelta(hours=12)

    def both(entity, refs, **kw):
        general.clear()
        got, want = (s.get_historical_features(entity_df=entity, features=refs, **kw).to_df() for s in (store, plain))
        ours = len(general) - 1  # (Feast's own store always joins once)
        keys = [c for c in entity.columns if c != "event_timestamp"]
        got, want = (f.sort_values(keys, kind="mergesort").reset_index(drop=True) for f in (got, want))
        pd.testing.assert_frame_equal(got, want)
        return got, ours

    for instant in (planted - pd.Timedelta(seconds=1), planted, pd.Timestamp(END, tz="UTC") + pd.Timedelta(days=1)):
        got, ours = both(rows.assign(event_timestamp=instant), FS.service_features(store, "user"))
        assert ours == 0
        assert len(got) == len(rows) and got["us_impressions_7d"].notna().any()
        country = got.loc[got["user_id"] == "u0000001", "u_country"]
        assert (country == "PLANTED").all() == (instant >= planted)
        assert got.loc[got["user_id"] == "nobody", "u_country"].isna().all()
    got, ours = both(items.assign(event_timestamp=planted), FS.service_features(store, "item"), full_feature_names=True)
    assert ours == 0 and got.filter(like="item_scenario_stats__").notna().any().any()
    # one DuckDB query, no ibis expression compiled; the expression (persisting, export) is the same rows
    job = store.get_historical_features(entity_df=rows.assign(event_timestamp=planted),
                                        features=FS.service_features(store, "user"))
    assert isinstance(job, InstantRetrievalJob) and job._table is None
    keys = [("user_id", "ascending"), ("scenario", "ascending")]
    assert job.table.to_pyarrow().sort_by(keys).equals(job.to_arrow().sort_by(keys))
    two = rows.assign(event_timestamp=planted)
    two.loc[two.index[:3], "event_timestamp"] = planted - pd.Timedelta(days=1)
    assert both(two, FS.service_features(store, "user"))[1] == 1


def test_retrieval_makes_entity_timestamps_utc_itself(built):
    """The store leaves entity timestamps as given (Feast's coercion is off: it boxes them into Python objects);
    mtrec's retrieval makes them UTC, so naive (taken as UTC) and zoned cut-offs of the same instant retrieve the
    same rows, and the same as a store that coerces them."""
    cfg, _ = built
    store = FS.feature_store(cfg)
    assert store.config.coerce_tz_aware is False
    coercing = FS.feature_store(cfg)
    coercing.config.coerce_tz_aware = True
    users = _user_scenarios(cfg)
    refs = FS.service_features(store, "user")
    instant = pd.Timestamp(END, tz="UTC") + pd.Timedelta(hours=12)
    frames = [_retrieve(s, users.assign(event_timestamp=ts), refs)
              .sort_values(["user_id", "scenario"]).reset_index(drop=True)
              for s, ts in ((store, instant), (store, instant.tz_localize(None)),
                            (store, instant.tz_convert("Asia/Kolkata")), (coercing, instant.tz_localize(None)))]
    assert frames[0]["us_impressions_7d"].notna().any()
    for other in frames[1:]:
        pd.testing.assert_frame_equal(other, frames[0])


def test_one_instant_retrievals_from_several_threads_equal_the_same_retrievals_one_at_a_time(built):
    """Scoring retrieves the user and item sides in several threads at once: each retrieval runs on a connection
    of its own (DuckDB refuses a second call on a busy one), with its own entity rows and the session settings,
    so the rows are those of the same retrievals made one at a time (and in UTC); the optimizer setting global to
    the database is restored once the last of them ends."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, _ = built
    store = FS.feature_store(cfg)
    users = _user_scenarios(cfg)
    instant = pd.Timestamp(END, tz="UTC") + pd.Timedelta(days=1)
    items = pd.DataFrame({"item_id": [f"i{n:07d}" for n in range(80)], "scenario": users["scenario"].iat[0]})
    jobs = [(users.iloc[k::3].assign(event_timestamp=instant), "user") for k in range(3)] + \
        [(items.assign(event_timestamp=instant), "item")] * 3

    def run(job):
        entity, side = job
        keys = [c for c in entity.columns if c != "event_timestamp"]
        return (store.get_historical_features(entity_df=entity, features=FS.service_features(store, side)).to_df()
                .sort_values(keys, kind="mergesort").reset_index(drop=True))

    alone = [run(job) for job in jobs]
    for _ in range(3):
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(run, jobs))
        for got, want in zip(together, alone, strict=True):
            pd.testing.assert_frame_equal(got, want)
    assert str(alone[0]["event_timestamp"].dt.tz) == "UTC" and alone[0]["us_impressions_7d"].notna().any()
    import ibis

    setting = "SELECT current_setting('disabled_optimizers')"
    assert "top_n_window_elimination" not in str(ibis.get_backend().con.cursor().execute(setting).fetchall()[0][0])
