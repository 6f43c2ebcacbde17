"""Publish stage on DuckDB and the real PostgreSQL: idempotent, scoped, atomic for readers and for killed writers.

Staged scores are synthetic frames with the contract's columns, written where the score stage writes them."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrec import schema as S
from mtrec.config import MtrecConfig, load_config
from mtrec.errors import DataContractError, StageError, WarehouseError
from mtrec.steps import publish
from mtrec.steps.base import read_manifest
from mtrec.warehouse import Warehouse, open_warehouse

D = dt.date(2024, 5, 10)
PREV = D - dt.timedelta(days=1)
REPO = Path(__file__).resolve().parents[2]


def make_cfg(tmp_path: Path, url: str, tasks: list[str] | None = None) -> MtrecConfig:
    over: dict = {"home": str(tmp_path / "home"), "warehouse_url": url}
    if tasks is not None:
        over["tasks"] = [{"name": t} for t in tasks]
    return load_config(environ={}, overrides=over)


def staged_frame(cfg: MtrecConfig, ds: dt.date, scenario: str, users: int, *, run_id: str, k: int = 10,
                 model_version: str = "v1", seed: int = 0) -> pd.DataFrame:
    """A top-k frame exactly as the score stage stages it (contract columns, order and types)."""
    rng = np.random.default_rng(seed)
    n = users * k
    uid = np.repeat(np.arange(users), k)
    score = np.sort(rng.random(n).reshape(users, k), axis=1)[:, ::-1].ravel()
    cols: dict = {
        "ds": [ds] * n,
        "scenario": scenario,
        "user_id": ("u" + pd.Series(uid).astype(str)).to_numpy(dtype=object),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), users),
        "item_id": ("i" + pd.Series(rng.integers(0, 10**6, n)).astype(str)).to_numpy(dtype=object),
        "score": score,
    }
    for t in cfg.task_names:
        cols[S.prob_column(t)] = rng.random(n)
    cols.update({"model_version": model_version, "run_id": run_id,
                 "created_at": pd.Timestamp(f"{ds + dt.timedelta(days=1)} 01:02:03.123456", tz="UTC")})
    df = pd.DataFrame(cols).astype({"ds": object})  # (an empty list would make it float)
    assert list(df.columns) == list(S.recommendations_spec(cfg).columns)
    return df


def stage(cfg: MtrecConfig, ds: dt.date, run_id: str, frames: dict[str, pd.DataFrame], *,
          model_version: str = "v1", counts: dict[str, int] | None = None) -> Path:
    d = publish.scores_dir(cfg, ds, run_id)
    d.mkdir(parents=True, exist_ok=True)
    for name, df in frames.items():
        df.to_parquet(d / f"{name}.parquet", index=False)
    marker = {"scenarios": counts or {s: len(df) for s, df in frames.items()}, "model_version": model_version,
              "ds": ds.isoformat()}
    (d / publish.SUCCESS_FILE).write_text(json.dumps(marker))
    return d


def canon(df: pd.DataFrame, cfg: MtrecConfig) -> pd.DataFrame:
    """Rows in a backend-independent form, sorted by key, for exact comparison."""
    out = df[list(S.recommendations_spec(cfg).columns)].copy()
    out["ds"] = pd.to_datetime(out["ds"]).dt.date
    out["rank"] = out["rank"].astype("int64")
    out["created_at"] = pd.to_datetime(out["created_at"], utc=True).dt.as_unit("us")
    for c in out.columns:
        if c.startswith("p_") or c == "score":
            out[c] = out[c].astype("float64")
    return out.sort_values(["scenario", "user_id", "rank"]).reset_index(drop=True)


def partition(wh: Warehouse, cfg: MtrecConfig, ds: dt.date, scenario: str) -> pd.DataFrame:
    return canon(wh.query_df("SELECT * FROM daily_recommendations WHERE ds = :d AND scenario = :s",
                             {"d": ds, "s": scenario}), cfg)


def everything(wh: Warehouse, cfg: MtrecConfig) -> pd.DataFrame:
    return canon(wh.query_df("SELECT * FROM daily_recommendations"), cfg).sort_values(
        ["ds", "scenario", "user_id", "rank"]).reset_index(drop=True)


@pytest.fixture
def duck(tmp_path: Path) -> MtrecConfig:
    return make_cfg(tmp_path, f"duckdb:///{tmp_path / 'wh.duckdb'}")


# -- 1. publish, republish, scope -----------------------------------------------------------------------------
def test_publish_republish_same_rows_other_partitions_untouched(tmp_path: Path, warehouse_url: str) -> None:
    cfg = make_cfg(tmp_path, warehouse_url)
    prev = {s: staged_frame(cfg, PREV, s, 120, run_id="r-prev", seed=i) for i, s in enumerate(["home", "video"])}
    first = {"home": staged_frame(cfg, D, "home", 300, run_id="r-a", seed=3),
             "search": staged_frame(cfg, D, "search", 200, run_id="r-a", seed=4)}
    second = {"home": staged_frame(cfg, D, "home", 450, k=8, run_id="r-b", model_version="v2", seed=5)}
    stage(cfg, PREV, "r-prev", prev)
    stage(cfg, D, "r-a", first)
    stage(cfg, D, "r-b", second, model_version="v2")
    wh = open_warehouse(cfg)
    try:
        assert publish.run(cfg, PREV, run_id="r-prev", wh=wh).rows == {"home": 1200, "video": 1200}
        only = publish.run(cfg, D, run_id="r-a", wh=wh, scenarios=["search"])
        assert only.rows == {"search": 2000}
        assert publish.run(cfg, D, run_id="r-a", wh=wh).rows == {"home": 3000, "search": 2000}
        pd.testing.assert_frame_equal(partition(wh, cfg, D, "home"), canon(first["home"], cfg))
        before = everything(wh, cfg)

        res = publish.run(cfg, D, run_id="r-b", wh=wh)
        assert res.status == "success" and res.rows == {"home": 3600} and res.model_version == "v2"
        after = everything(wh, cfg)
        pd.testing.assert_frame_equal(partition(wh, cfg, D, "home"), canon(second["home"], cfg))
        untouched = lambda df: df[(df["ds"] != D) | (df["scenario"] != "home")].reset_index(drop=True)  # noqa: E731
        pd.testing.assert_frame_equal(untouched(after), untouched(before))
        assert len(untouched(after)) == 2400 + 2000

        for _ in range(2):  # republishing the same run: same rows, no duplicates
            assert publish.run(cfg, D, run_id="r-b", wh=wh).rows == {"home": 3600}
            pd.testing.assert_frame_equal(everything(wh, cfg), after)
        assert not after.duplicated(["ds", "scenario", "user_id", "rank"]).any()
        assert wh.scalar("SELECT count(*) FROM daily_recommendations") == 1200 * 2 + 2000 + 3600

        runs = wh.query_df("SELECT run_id, stage, status, details FROM pipeline_runs WHERE stage = 'publish' "
                           "ORDER BY run_id")
        assert runs["run_id"].tolist() == ["r-a", "r-b", "r-prev"] and set(runs["status"]) == {"success"}
        details = {r.run_id: json.loads(r.details) for r in runs.itertuples()}
        assert details["r-a"]["rows"] == {"home": 3000, "search": 2000}
        assert details["r-b"]["rows"] == {"home": 3600} and details["r-b"]["model_version"] == "v2"
        assert read_manifest(cfg, D, "r-b")["stages"]["publish"]["details"]["rows"] == {"home": 3600}
    finally:
        wh.close()


def test_columns_of_removed_tasks_become_null(tmp_path: Path, warehouse_url: str) -> None:
    """A republish after a task left the config leaves no stale p_<task> values behind (as delete+insert)."""
    old = make_cfg(tmp_path, warehouse_url)
    new = make_cfg(tmp_path, warehouse_url, tasks=["click"])
    stage(old, D, "r-old", {"home": staged_frame(old, D, "home", 50, run_id="r-old")})
    stage(new, D, "r-new", {"home": staged_frame(new, D, "home", 60, run_id="r-new", seed=1)})
    wh = open_warehouse(old)
    try:
        publish.run(old, D, run_id="r-old", wh=wh)
        assert publish.run(new, D, run_id="r-new", wh=wh).rows == {"home": 600}
        got = wh.query_df("SELECT count(*) AS n, count(p_like) AS p_like, count(p_click) AS p_click, "
                          "min(run_id) AS run FROM daily_recommendations")
        assert got.iloc[0].tolist() == [600, 0, 600, "r-new"]
    finally:
        wh.close()


def test_fast_writer_matches_plain_delete_insert_and_empty_staging_empties(tmp_path: Path, warehouse_url: str) -> None:
    """The backend-specific writer (COPY / DuckDB update-in-place) ends exactly where delete + insert_df does."""
    import pyarrow as pa

    cfg = make_cfg(tmp_path, warehouse_url)
    old = staged_frame(cfg, D, "home", 300, run_id="r-1")
    # Overlapping keys (users 0..199 stay, 200..299 go, 300..399 are new) with new values.
    new = staged_frame(cfg, D, "home", 400, run_id="r-2", seed=7).query("user_id not in @gone",
                                                                          local_dict={"gone": ["u5", "u7"]})
    stage(cfg, D, "r-1", {"home": old})
    stage(cfg, D, "r-2", {"home": new, "video": staged_frame(cfg, D, "video", 0, run_id="r-2")})
    stage(cfg, D, "r-3", {"video": staged_frame(cfg, D, "video", 30, run_id="r-3")})
    wh = open_warehouse(cfg)
    try:
        publish.run(cfg, D, run_id="r-3", wh=wh)
        publish.run(cfg, D, run_id="r-1", wh=wh)
        res = publish.run(cfg, D, run_id="r-2", wh=wh)
        assert res.rows == {"home": 3980, "video": 0}
        assert res.warnings == ["scenario video: no staged rows, the partition is emptied"]
        fast = everything(wh, cfg)
        pd.testing.assert_frame_equal(fast, canon(new, cfg))
        table, _ = publish.load_staged(cfg, D, "r-2", "home", None)
        publish.write_partition(wh, pa.Table.from_pandas(old, preserve_index=False), D, "home")
        assert publish._write_generic(wh, table, D, "home") == 3980
        pd.testing.assert_frame_equal(everything(wh, cfg), fast)
    finally:
        wh.close()


# -- 2. concurrent reader during a rewrite (PostgreSQL) --------------------------------------------------------
def _pg_conninfo(postgres_url: str) -> tuple[str, str]:
    base, _, query = postgres_url.partition("?")
    schema = dict(p.split("=", 1) for p in query.split("&"))["schema"]
    return base, schema


@pytest.mark.services
def test_concurrent_reader_sees_old_or_new_partition(tmp_path: Path, postgres_url: str) -> None:
    import psycopg

    cfg = make_cfg(tmp_path, postgres_url)
    old = staged_frame(cfg, D, "home", 20_000, run_id="r-old")
    new = staged_frame(cfg, D, "home", 25_000, run_id="r-new", seed=1)
    stage(cfg, D, "r-old", {"home": old})
    stage(cfg, D, "r-new", {"home": new})
    wh = open_warehouse(cfg)
    publish.run(cfg, D, run_id="r-old", wh=wh)
    base, schema = _pg_conninfo(postgres_url)
    seen: list[tuple[int, tuple[str, ...]]] = []
    stop, started = threading.Event(), threading.Event()

    def reader() -> None:
        with psycopg.connect(base, autocommit=True) as con:
            con.execute(f'SET search_path = "{schema}"')
            while True:
                last = stop.is_set()
                n, runs = con.execute("SELECT count(*), array_agg(DISTINCT run_id) FROM daily_recommendations "
                                      "WHERE ds = %s AND scenario = 'home'", (D,)).fetchone()
                seen.append((n, tuple(runs or ())))
                started.set()
                if last:
                    return

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert started.wait(10)
        writes = len(seen)
        res = publish.run(cfg, D, run_id="r-new", wh=wh)
        during = len(seen) - writes
        stop.set()
        t.join(30)
    finally:
        stop.set()
        wh.close()
    assert res.rows == {"home": 250_000}
    assert set(seen) <= {(200_000, ("r-old",)), (250_000, ("r-new",))}, sorted(set(seen))[:5]
    assert seen[0] == (200_000, ("r-old",)) and seen[-1] == (250_000, ("r-new",))
    assert during >= 5, f"the reader only polled {during} times during the write"


@pytest.mark.services
def test_concurrent_publishers_of_one_partition_serialise(tmp_path: Path, postgres_url: str) -> None:
    cfg = make_cfg(tmp_path, postgres_url)
    frames = {r: staged_frame(cfg, D, "home", 3000 + 500 * i, run_id=r, seed=i) for i, r in enumerate(["r1", "r2"])}
    for r, df in frames.items():
        stage(cfg, D, r, {"home": df})
    errors: list[BaseException] = []

    def go(r: str) -> None:
        try:
            publish.run(cfg, D, run_id=r)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(r,)) for r in frames]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    wh = open_warehouse(cfg)
    try:
        got = partition(wh, cfg, D, "home")
        winner = got["run_id"].iloc[0]
        pd.testing.assert_frame_equal(got, canon(frames[winner], cfg))
    finally:
        wh.close()


# -- 3. a writer killed by SIGKILL in the middle ---------------------------------------------------------------
KILLED_WRITER = r"""
import datetime as dt, sys, time
from pathlib import Path
from mtrec.config import load_config
from mtrec.steps import publish
home, url, ds, run_id, marker, mode = sys.argv[1:7]
if mode == "before_commit":  # all rows written inside the transaction, then stall before the commit
    check = publish._check_count
    def stalled(*a, **k):
        n = check(*a, **k)
        Path(marker).write_text(str(n))
        time.sleep(300)
    publish._check_count = stalled
cfg = load_config(environ={}, overrides={"home": home, "warehouse_url": url})
publish.run(cfg, dt.date.fromisoformat(ds), run_id=run_id)
Path(marker + ".done").write_text("published")
"""


def _start_writer(cfg: MtrecConfig, url: str, run_id: str, marker: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(cfg.home), url, D.isoformat(), run_id,
                             str(marker), mode], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(cond, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"writer exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.services
@pytest.mark.parametrize("mode", ["during_copy", "before_commit"])
def test_postgres_writer_killed_mid_write_leaves_old_partition(tmp_path: Path, postgres_url: str, mode: str) -> None:
    import psycopg

    cfg = make_cfg(tmp_path, postgres_url)
    # The COPY of 200k rows lasts long enough (> 0.5 s) to be caught; a stalled commit needs no volume.
    users = 20_000 if mode == "during_copy" else 3000
    stage(cfg, D, "r-old", {"home": staged_frame(cfg, D, "home", 5000, run_id="r-old")})
    stage(cfg, D, "r-new", {"home": staged_frame(cfg, D, "home", users, run_id="r-new", seed=1)})
    wh = open_warehouse(cfg)
    try:
        publish.run(cfg, D, run_id="r-old", wh=wh)
        before = everything(wh, cfg)
    finally:
        wh.close()
    app = f"mtrec_kill_{os.getpid()}_{mode}"
    base, _ = _pg_conninfo(postgres_url)
    marker = tmp_path / "in-transaction"
    proc = _start_writer(cfg, f"{postgres_url}&application_name={app}", "r-new", marker, mode)
    with psycopg.connect(base, autocommit=True) as mon:
        def backend(cond: str):
            return mon.execute(f"SELECT pid FROM pg_stat_activity WHERE application_name = %s AND {cond}",
                               (app,)).fetchone()

        if mode == "during_copy":
            _wait_for(lambda: backend("state = 'active' AND query LIKE 'COPY %%'"), proc, 60, "the COPY")
        else:
            _wait_for(marker.exists, proc, 60, "the stalled commit")
            assert marker.read_text() == "30000"  # the writer's transaction holds the whole new partition
            assert backend("state = 'idle in transaction'")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL and not Path(f"{marker}.done").exists()
        deadline = time.monotonic() + 30  # the server aborts the dead client's transaction
        while backend("TRUE") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not backend("TRUE")
    wh = open_warehouse(cfg)
    try:
        pd.testing.assert_frame_equal(everything(wh, cfg), before)
        assert publish.run(cfg, D, run_id="r-new", wh=wh).rows == {"home": users * 10}  # no lock left behind
    finally:
        wh.close()


def test_duckdb_writer_killed_before_commit_leaves_old_partition(tmp_path: Path, duck: MtrecConfig) -> None:
    cfg = duck
    stage(cfg, D, "r-old", {"home": staged_frame(cfg, D, "home", 5000, run_id="r-old"),
                            "video": staged_frame(cfg, D, "video", 1000, run_id="r-old", seed=2)})
    # 130k rows: more than one DuckDB row group, so part of the new rows reach the file before the commit.
    new = {"home": staged_frame(cfg, D, "home", 13_000, run_id="r-new", seed=1),
           "video": staged_frame(cfg, D, "video", 800, run_id="r-new", seed=3)}
    stage(cfg, D, "r-new", new)
    wh = open_warehouse(cfg)
    try:
        publish.run(cfg, D, run_id="r-old", wh=wh)
        before = everything(wh, cfg)
    finally:
        wh.close()  # DuckDB: one writing process at a time
    marker = tmp_path / "in-transaction"
    proc = _start_writer(cfg, cfg.resolved_warehouse_url, "r-new", marker, "before_commit")
    _wait_for(marker.exists, proc, 60, "the stalled commit")
    assert marker.read_text() == "130000"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wh = open_warehouse(cfg)
    try:
        pd.testing.assert_frame_equal(everything(wh, cfg), before)
        assert publish.run(cfg, D, run_id="r-new", wh=wh).rows == {"home": 130_000, "video": 8000}
        pd.testing.assert_frame_equal(everything(wh, cfg), canon(pd.concat(new.values()), cfg))
    finally:
        wh.close()


# -- 4. bad staged input --------------------------------------------------------------------------------------
def _dup_rank(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[11, "rank"] = df.loc[10, "rank"]
    return df


BAD = {
    "duplicate_rank": (_dup_rank, r"column rank, date 2024-05-10: .*duplicate \(user_id, rank\) = \(u1, 1\)"),
    "wrong_ds": (lambda df: df.assign(ds=PREV), r"column ds, date 2024-05-10: .*ds = 2024-05-09, expected 2024-05-10"),
    "missing_column": (lambda df: df.drop(columns=["p_like"]), r"column p_like, date 2024-05-10: .*missing column"),
    "null_item": (lambda df: df.assign(item_id=df["item_id"].where(df.index != 7, None)),
                  r"column item_id, date 2024-05-10: .*1 null value"),
    "wrong_scenario": (lambda df: df.assign(scenario="video"), r"column scenario, .*scenario = video, expected home"),
    "probability_range": (lambda df: df.assign(p_click=df["p_click"] * 3), r"column p_click, .*outside \[0, 1\]"),
    "nan_score": (lambda df: df.assign(score=df["score"].where(df.index != 3, np.nan)), r"column score, .*1 null"),
    "text_rank": (lambda df: df.assign(rank=df["rank"].astype(str)), r"column rank, .*type string"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_staged_input_is_rejected_and_nothing_changes(tmp_path: Path, warehouse_url: str, case: str) -> None:
    cfg = make_cfg(tmp_path, warehouse_url)
    stage(cfg, D, "r-good", {"home": staged_frame(cfg, D, "home", 40, run_id="r-good"),
                             "video": staged_frame(cfg, D, "video", 30, run_id="r-good", seed=1)})
    breaker, pattern = BAD[case]
    bad = breaker(staged_frame(cfg, D, "home", 50, run_id="r-bad", seed=2))
    # A valid scenario staged (and listed) before the bad one must not be published either.
    stage(cfg, D, "r-bad", {"search": staged_frame(cfg, D, "search", 20, run_id="r-bad", seed=3), "home": bad})
    wh = open_warehouse(cfg)
    try:
        publish.run(cfg, D, run_id="r-good", wh=wh)
        before = everything(wh, cfg)
        with pytest.raises(DataContractError, match=r"^table daily_recommendations, " + pattern) as info:
            publish.run(cfg, D, run_id="r-bad", wh=wh)
        assert "\n" not in str(info.value) and info.value.ds == D
        pd.testing.assert_frame_equal(everything(wh, cfg), before)
        runs = wh.query_df("SELECT status, message FROM pipeline_runs WHERE run_id = 'r-bad' AND stage = 'publish'")
        assert runs["status"].tolist() == ["failed"] and runs["message"].iloc[0] == str(info.value)
    finally:
        wh.close()


def test_row_count_different_from_success_marker_is_rejected(tmp_path: Path, duck: MtrecConfig) -> None:
    stage(duck, D, "r", {"home": staged_frame(duck, D, "home", 10, run_id="r")}, counts={"home": 120})
    with pytest.raises(DataContractError, match=r"date 2024-05-10: .*100 rows but _SUCCESS.json announces 120"):
        publish.run(duck, D, run_id="r")


@pytest.mark.services
def test_postgres_count_check_rolls_back_a_short_write(tmp_path: Path, postgres_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows lost on the way in (here: the COPY stream leaves out rank 3) fail the count check; the old rows stay."""
    import pyarrow.compute as pc

    cfg = make_cfg(tmp_path, postgres_url)
    stage(cfg, D, "r-old", {"home": staged_frame(cfg, D, "home", 100, run_id="r-old")})
    stage(cfg, D, "r-new", {"home": staged_frame(cfg, D, "home", 120, run_id="r-new", seed=1),
                            "video": staged_frame(cfg, D, "video", 30, run_id="r-new", seed=2)})
    wh = open_warehouse(cfg)
    try:
        publish.run(cfg, D, run_id="r-old", wh=wh)
        before = everything(wh, cfg)
        encode = publish._binary_rows
        monkeypatch.setattr(publish, "_binary_rows", lambda t: encode(t.filter(pc.not_equal(t["rank"], 3))))
        with pytest.raises(WarehouseError, match=r"date 2024-05-10: scenario home: 1080 rows .* 1200 staged"):
            publish.run(cfg, D, run_id="r-new", wh=wh)
        pd.testing.assert_frame_equal(everything(wh, cfg), before)  # video (listed after home) not published
        monkeypatch.undo()
        assert publish.run(cfg, D, run_id="r-new", wh=wh).rows == {"home": 1200, "video": 300}
    finally:
        wh.close()


# -- 5. missing staged scores ----------------------------------------------------------------------------------
def test_missing_staged_scores_is_a_stage_error(duck: MtrecConfig) -> None:
    with pytest.raises(StageError, match=r"^table daily_recommendations, date 2024-05-10: no staged scores for run "
                                         r"r-none at .*_SUCCESS.json: run `mtrec score` first$"):
        publish.run(duck, D, run_id="r-none")
    # Files without the completion marker are an unfinished score run: not published.
    d = publish.scores_dir(duck, D, "r-partial")
    d.mkdir(parents=True)
    staged_frame(duck, D, "home", 5, run_id="r-partial").to_parquet(d / "home.parquet")
    with pytest.raises(StageError, match="no staged scores for run r-partial"):
        publish.run(duck, D, run_id="r-partial")
    stage(duck, D, "r-one", {"home": staged_frame(duck, D, "home", 5, run_id="r-one")})
    with pytest.raises(StageError, match=r"scenario\(s\) video not staged by run r-one \(staged: home\)"):
        publish.run(duck, D, run_id="r-one", scenarios=["video"])
    (publish.scores_path(duck, D, "r-one", "home")).unlink()
    with pytest.raises(StageError, match=r"date 2024-05-10: no staged scores for scenario home of run r-one"):
        publish.run(duck, D, run_id="r-one")
    wh = open_warehouse(duck)
    try:
        runs = wh.query_df("SELECT run_id, status FROM pipeline_runs WHERE stage = 'publish' ORDER BY run_id")
        assert runs.values.tolist() == [["r-none", "failed"], ["r-one", "failed"], ["r-partial", "failed"]]
        assert wh.scalar("SELECT count(*) FROM daily_recommendations") == 0
    finally:
        wh.close()


# -- 6. PostgreSQL layout: one leaf per (ds, scenario) --------------------------------------------------------
def _relkind(wh: Warehouse, name: str) -> str | None:
    return wh.scalar("SELECT relkind FROM pg_class WHERE relname = :n AND relnamespace = current_schema()::regnamespace",
                     {"n": name})


def _normalized(cfg: MtrecConfig, df: pd.DataFrame) -> pd.DataFrame:
    from mtrec.warehouse.base import normalize_frame

    return normalize_frame(df, S.recommendations_spec(cfg).columns)


@pytest.mark.services
def test_postgres_table_of_an_earlier_version_is_converted_once(tmp_path: Path, postgres_url: str) -> None:
    """A plain daily_recommendations (as earlier versions and ensure_contract_tables create it) keeps its rows and
    grants, becomes partitioned on the first publish, and the conversion does nothing the second time."""
    from mtrec.warehouse import ensure_contract_tables

    cfg = make_cfg(tmp_path, postgres_url)
    old = {(PREV, "home"): staged_frame(cfg, PREV, "home", 40, run_id="r-0"),
           (PREV, "video"): staged_frame(cfg, PREV, "video", 30, run_id="r-0", seed=1),
           (D, "home"): staged_frame(cfg, D, "home", 50, run_id="r-0", seed=2)}
    new = {"home": staged_frame(cfg, D, "home", 60, run_id="r-1", seed=3),
           "search": staged_frame(cfg, D, "search", 20, run_id="r-1", seed=4)}
    stage(cfg, D, "r-1", new)
    wh = open_warehouse(cfg)
    try:
        ensure_contract_tables(wh, cfg)
        for df in old.values():
            wh.insert_df("daily_recommendations", _normalized(cfg, df))
        wh.execute("GRANT SELECT ON daily_recommendations TO PUBLIC")
        assert _relkind(wh, "daily_recommendations") == "r"

        assert publish.run(cfg, D, run_id="r-1", wh=wh).rows == {"home": 600, "search": 200}
        assert _relkind(wh, "daily_recommendations") == "p"
        expected = canon(pd.concat([old[(PREV, "home")], old[(PREV, "video")], *new.values()]), cfg)
        expected = expected.sort_values(["ds", "scenario", "user_id", "rank"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(everything(wh, cfg), expected)
        assert wh.scalar("SELECT has_table_privilege('public', 'daily_recommendations', 'SELECT')")
        tables = wh.query_df("SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
                             "AND relkind IN ('r', 'p') ORDER BY 1")["relname"].tolist()
        publish._pg_ensure_partitioned(wh)  # a second time: nothing to do
        assert publish.run(cfg, D, run_id="r-1", wh=wh).rows == {"home": 600, "search": 200}
        pd.testing.assert_frame_equal(everything(wh, cfg), expected)
        assert wh.query_df("SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
                           "AND relkind IN ('r', 'p') ORDER BY 1")["relname"].tolist() == tables
        assert "daily_recommendations_unpartitioned" not in tables
        assert publish._pg_names(D, "home") in tables and publish._pg_names(PREV) in tables

        # Readers look up (ds, scenario, user_id): served by the leaf's primary key.
        with wh.transaction():
            wh.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(wh.query_df("EXPLAIN SELECT * FROM daily_recommendations WHERE ds = :d AND "
                                         "scenario = 'home' AND user_id = 'u7'", {"d": D}).iloc[:, 0])
        assert f"Index Scan using {publish._pg_names(D, 'home')}_pkey" in plan, plan
    finally:
        wh.close()


@pytest.mark.services
def test_postgres_rows_of_other_writers_are_replaced_and_keys_stay_unique(tmp_path: Path, postgres_url: str) -> None:
    """Rows that insert_df put in the DEFAULT partitions (a day or a scenario without its own table yet) are
    replaced by the publish of their partition; the primary key holds for every writer."""
    nxt = D + dt.timedelta(days=1)
    cfg = make_cfg(tmp_path, postgres_url)
    stage(cfg, D, "r-1", {"home": staged_frame(cfg, D, "home", 30, run_id="r-1")})
    stage(cfg, D, "r-2", {"video": staged_frame(cfg, D, "video", 25, run_id="r-2", seed=1)})
    stage(cfg, nxt, "r-3", {"home": staged_frame(cfg, nxt, "home", 35, run_id="r-3", seed=2)})
    wh = open_warehouse(cfg)
    try:
        publish.run(cfg, D, run_id="r-1", wh=wh)
        other = {"video": staged_frame(cfg, D, "video", 10, run_id="other", seed=5),
                 "search": staged_frame(cfg, D, "search", 10, run_id="other", seed=6),
                 "next": staged_frame(cfg, nxt, "home", 10, run_id="other", seed=7)}
        for df in other.values():
            wh.insert_df("daily_recommendations", _normalized(cfg, df))
        with pytest.raises(WarehouseError):  # a key already in a leaf
            wh.insert_df("daily_recommendations", _normalized(cfg, staged_frame(cfg, D, "home", 1, run_id="x")))
        assert wh.scalar("SELECT count(*) FROM daily_recommendations_default") == 100
        assert wh.scalar(f"SELECT count(*) FROM {publish._pg_names(D)}_default") == 200

        publish.run(cfg, D, run_id="r-2", wh=wh)
        publish.run(cfg, nxt, run_id="r-3", wh=wh)
        got = everything(wh, cfg)
        assert not got.duplicated(["ds", "scenario", "user_id", "rank"]).any()
        pd.testing.assert_frame_equal(partition(wh, cfg, D, "video"), canon(stage_frame_of(cfg, D, "r-2"), cfg))
        pd.testing.assert_frame_equal(partition(wh, cfg, nxt, "home"), canon(stage_frame_of(cfg, nxt, "r-3"), cfg))
        pd.testing.assert_frame_equal(partition(wh, cfg, D, "search"), canon(other["search"], cfg))
        assert len(got) == 300 + 250 + 350 + 100
        assert wh.scalar("SELECT count(*) FROM daily_recommendations_default") == 0
    finally:
        wh.close()


def stage_frame_of(cfg: MtrecConfig, ds: dt.date, run_id: str) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted(publish.scores_dir(cfg, ds, run_id).glob("*.parquet")))


SCENARIO_NAMES = ["home", "Home", "home feed-ä", "home_feed_a", "O'Brien \"quoted\"", "x" * 80]


def test_any_scenario_name_gives_its_own_valid_table_name() -> None:
    from mtrec.config import check_identifier

    names = [publish._pg_names(D, s) for s in SCENARIO_NAMES]
    assert len(set(names)) == len(names)
    for n in names:  # raises if too long or unsafe, with the suffixes of the load table and its key
        check_identifier(n)
        check_identifier(f"{n}_n_pkey")


@pytest.mark.services
def test_postgres_arbitrary_scenario_names_and_concurrent_days(tmp_path: Path, postgres_url: str) -> None:
    """Publishers of different scenarios of a new day (and of a fresh database) run at the same time."""
    cfg = make_cfg(tmp_path, postgres_url)
    frames = {s: staged_frame(cfg, D, s, 20 + i, run_id=f"r{i}", seed=i) for i, s in enumerate(SCENARIO_NAMES)}
    for i, (s, df) in enumerate(frames.items()):
        stage(cfg, D, f"r{i}", {s: df})
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            publish.run(cfg, D, run_id=f"r{i}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(frames))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert errors == []
    wh = open_warehouse(cfg)
    try:
        for s, df in frames.items():
            pd.testing.assert_frame_equal(partition(wh, cfg, D, s), canon(df, cfg))
    finally:
        wh.close()


def test_item_recommended_twice_is_a_warning_and_rows_come_in_key_order(tmp_path: Path, duck: MtrecConfig) -> None:
    df = staged_frame(duck, D, "home", 30, run_id="r")
    df.loc[27, "item_id"] = df.loc[22, "item_id"]  # user u2, ranks 3 and 8
    stage(duck, D, "r", {"home": df.sample(frac=1, random_state=0)})
    table, warnings = publish.load_staged(duck, D, "r", "home", 300)
    assert warnings == [f"scenario home: item {df.loc[22, 'item_id']} recommended twice to user u2"]
    keys = list(zip(table["user_id"].to_pylist(), table["rank"].to_pylist(), strict=True))
    assert keys == sorted(keys)
    assert publish.run(duck, D, run_id="r").warnings == warnings


@pytest.mark.services
def test_postgres_long_reader_delays_the_swap_but_not_the_readers_after_it(tmp_path: Path, postgres_url: str) -> None:
    """A reader transaction open on the day holds the publisher back (the old partition stays whole); readers that
    come after it are not queued behind the publisher's exclusive lock request."""
    import psycopg

    cfg = make_cfg(tmp_path, postgres_url)
    stage(cfg, D, "r-old", {"home": staged_frame(cfg, D, "home", 40, run_id="r-old"),
                            "video": staged_frame(cfg, D, "video", 20, run_id="r-old", seed=1)})
    stage(cfg, D, "r-new", {"home": staged_frame(cfg, D, "home", 50, run_id="r-new", seed=2)})
    publish.run(cfg, D, run_id="r-old")
    base, schema = _pg_conninfo(postgres_url)
    done: list[object] = []
    with psycopg.connect(base, options=f"-c search_path={schema}") as long_reader, \
            psycopg.connect(base, autocommit=True, options=f"-c search_path={schema} -c statement_timeout=20s") as r:
        assert long_reader.execute("SELECT count(*) FROM daily_recommendations WHERE ds = %s", (D,)).fetchone() == (600,)
        writer = threading.Thread(target=lambda: done.append(publish.run(cfg, D, run_id="r-new")))
        writer.start()
        deadline = time.monotonic() + 60
        while not r.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock'"
                            ).fetchone()[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(5):  # each would wait for the long reader if queued behind the publisher
            assert r.execute("SELECT count(*), min(run_id) FROM daily_recommendations WHERE ds = %s "
                             "AND scenario = 'home'", (D,)).fetchone() == (400, "r-old")
        assert writer.is_alive() and not done
        long_reader.commit()
        writer.join(60)
        assert r.execute("SELECT count(*), min(run_id) FROM daily_recommendations WHERE ds = %s "
                         "AND scenario = 'home'", (D,)).fetchone() == (500, "r-new")
    assert [res.rows for res in done] == [{"home": 500}]


@pytest.mark.services
def test_postgres_table_with_other_column_types_is_loaded_as_csv(tmp_path: Path, postgres_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Binary COPY needs the contract's exact types; a table whose rank is integer (say) gets CSV instead."""
    from mtrec.warehouse import ensure_contract_tables

    cfg = make_cfg(tmp_path, postgres_url)
    df = staged_frame(cfg, D, "home", 40, run_id="r-1")
    stage(cfg, D, "r-1", {"home": df})
    wh = open_warehouse(cfg)
    try:
        ensure_contract_tables(wh, cfg)
        wh.execute("ALTER TABLE daily_recommendations ALTER COLUMN rank TYPE integer")

        def no_binary(table):
            raise AssertionError("binary COPY into an integer column")

        monkeypatch.setattr(publish, "_binary_rows", no_binary)
        assert publish.run(cfg, D, run_id="r-1", wh=wh).rows == {"home": 400}
        pd.testing.assert_frame_equal(partition(wh, cfg, D, "home"), canon(df, cfg))
        assert wh.columns("daily_recommendations")["rank"] == "integer"
    finally:
        wh.close()


@pytest.mark.services
def test_postgres_plain_table_with_a_view_on_it_stays_plain_and_is_replaced_in_place(
        tmp_path: Path, postgres_url: str) -> None:
    """Views (or foreign keys) on an earlier plain table would be lost by the conversion: the table stays as it
    is and each partition is replaced by DELETE + COPY in the one transaction, same rows as the partitioned way."""
    from mtrec.warehouse import ensure_contract_tables

    cfg = make_cfg(tmp_path, postgres_url)
    first = {"home": staged_frame(cfg, D, "home", 40, run_id="r-1"),
             "video": staged_frame(cfg, D, "video", 20, run_id="r-1", seed=1)}
    second = {"home": staged_frame(cfg, D, "home", 30, k=7, run_id="r-2", seed=2)}
    stage(cfg, D, "r-1", first)
    stage(cfg, D, "r-2", second)
    wh = open_warehouse(cfg)
    try:
        ensure_contract_tables(wh, cfg)
        wh.execute("CREATE VIEW latest_home AS SELECT user_id, rank FROM daily_recommendations WHERE scenario = 'home'")
        assert publish.run(cfg, D, run_id="r-1", wh=wh).rows == {"home": 400, "video": 200}
        assert publish.run(cfg, D, run_id="r-2", wh=wh).rows == {"home": 210}
        assert _relkind(wh, "daily_recommendations") == "r"
        pd.testing.assert_frame_equal(everything(wh, cfg), canon(pd.concat([second["home"], first["video"]]), cfg))
        assert wh.scalar("SELECT count(*) FROM latest_home") == 210
    finally:
        wh.close()
