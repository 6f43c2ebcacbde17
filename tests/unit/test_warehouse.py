"""Warehouse backends: contract tables, atomic partition overwrite, identifier checks (DuckDB and PostgreSQL)."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from mtrec.errors import WarehouseError
from mtrec.schema import recommendations_spec
from mtrec.warehouse import as_utc, ensure_contract_tables, open_warehouse, q

DS = dt.date(2024, 3, 1)


def _recs(cfg, scenario: str, users: list[str], k: int, version: str) -> pd.DataFrame:
    rows = [{"ds": DS, "scenario": scenario, "user_id": u, "rank": r, "item_id": f"i{r}", "score": 1.0 / r,
             "p_click": 0.1, "p_like": 0.01, "model_version": version, "run_id": "r1",
             "created_at": pd.Timestamp("2024-03-02", tz="UTC")} for u in users for r in range(1, k + 1)]
    return pd.DataFrame(rows)


def test_partition_overwrite_is_idempotent_and_scoped(cfg, warehouse_url):
    wh = open_warehouse(warehouse_url)
    try:
        ensure_contract_tables(wh, cfg)
        spec = recommendations_spec(cfg)
        wh.write_normalized(spec, _recs(cfg, "home", ["u1", "u2"], 3, "v1"), {"ds": DS, "scenario": "home"})
        wh.write_normalized(spec, _recs(cfg, "search", ["u1"], 2, "v1"), {"ds": DS, "scenario": "search"})
        for _ in range(2):  # rewrite home twice with other content
            wh.write_normalized(spec, _recs(cfg, "home", ["u3"], 4, "v2"), {"ds": DS, "scenario": "home"})
        got = wh.query_df("SELECT scenario, user_id, model_version, count(*) AS n FROM daily_recommendations "
                          "GROUP BY 1, 2, 3 ORDER BY 1, 2")
        assert got.to_dict("records") == [
            {"scenario": "home", "user_id": "u3", "model_version": "v2", "n": 4},
            {"scenario": "search", "user_id": "u1", "model_version": "v1", "n": 2},
        ]
    finally:
        wh.close()


def test_failed_write_leaves_partition_intact(cfg, warehouse_url):
    wh = open_warehouse(warehouse_url)
    try:
        ensure_contract_tables(wh, cfg)
        spec = recommendations_spec(cfg)
        wh.write_normalized(spec, _recs(cfg, "home", ["u1"], 3, "v1"), {"ds": DS, "scenario": "home"})
        bad = _recs(cfg, "home", ["u1"], 3, "v2")
        bad.loc[2, "rank"] = 1  # duplicate primary key: the insert fails after the delete
        with pytest.raises(WarehouseError):
            wh.write_normalized(spec, bad, {"ds": DS, "scenario": "home"})
        got = wh.query_df("SELECT model_version, count(*) AS n FROM daily_recommendations GROUP BY 1")
        assert got.to_dict("records") == [{"model_version": "v1", "n": 3}]
    finally:
        wh.close()


def test_a_duckdb_reader_reads_beside_its_warehouse(tmp_path):
    """`reader()`: another connection to the same database, whose query runs while the warehouse's own lock is
    held by another thread; it sees what is committed, and closing it leaves the warehouse open."""
    import threading

    wh = open_warehouse(f"duckdb:///{tmp_path / 'wh.duckdb'}")
    try:
        wh.execute("CREATE TABLE t (x INTEGER)")
        wh.execute("INSERT INTO t VALUES (1), (2)")
        reader = wh.reader()
        held, release, got = threading.Event(), threading.Event(), []

        def hold() -> None:
            with wh.transaction():  # the warehouse's lock, held until released
                wh.execute("INSERT INTO t VALUES (3)")
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(10)
        side = threading.Thread(target=lambda: got.append(reader.scalar("SELECT sum(x) FROM t")))
        side.start()
        side.join(5)
        answered = not side.is_alive()
        release.set()
        holder.join()
        side.join()
        assert answered and got == [3]  # beside the held lock; the uncommitted row is not seen
        assert reader.scalar("SELECT sum(x) FROM t") == 6  # committed now
        reader.close()
        assert wh.scalar("SELECT count(*) FROM t") == 3
    finally:
        wh.close()


def test_statements_leave_no_open_result_between_threads(cfg, warehouse_url):
    """Scoring reads the warehouse from several threads: after a scalar, a DDL or an insert, the next bulk write
    (which registers a frame on DuckDB) must not find a result left open by the previous statement."""
    import threading

    wh = open_warehouse(warehouse_url)
    try:
        wh.execute("CREATE TABLE scratch_t (a INTEGER)")
        df = pd.DataFrame({"a": [1, 2, 3]})
        steps = [lambda: wh.table_exists("scratch_t"), lambda: wh.scalar("SELECT a FROM scratch_t ORDER BY a"),
                 lambda: wh.insert_df("scratch_t", df), lambda: wh.execute("DELETE FROM scratch_t WHERE a = 2")]
        errors: list[BaseException] = []
        for step in steps:  # one statement in a thread, a bulk write in another
            t = threading.Thread(target=lambda s=step: errors.extend(_catch(s)))
            t.start()
            t.join()
            wh.insert_df("scratch_t", df)
        assert not errors
        # five inserts of 3 rows; the DELETE ran after four of them and removed their four rows with a = 2
        assert wh.scalar("SELECT count(*) FROM scratch_t") == 5 * 3 - 4
    finally:
        wh.close()


def test_a_transaction_belongs_to_its_thread(postgres_url):
    """PostgreSQL: while one thread's transaction is open (its row not committed), another thread's statements run
    on a connection of their own: they neither see the uncommitted row nor take part in that transaction (the
    score stage creates a scratch table in one thread while others query)."""
    import threading

    wh = open_warehouse(postgres_url)
    try:
        wh.execute("CREATE TABLE scratch_t (a INTEGER)")
        inside, checked = threading.Event(), threading.Event()

        def writer() -> None:
            with wh.transaction():
                wh.execute("INSERT INTO scratch_t VALUES (1)")
                inside.set()
                checked.wait(30)

        t = threading.Thread(target=writer)
        t.start()
        assert inside.wait(30)
        during = wh.scalar("SELECT count(*) FROM scratch_t")  # another thread, while the transaction is open
        checked.set()
        t.join()
        assert (during, wh.scalar("SELECT count(*) FROM scratch_t")) == (0, 1)
    finally:
        wh.close()


def _catch(step) -> list[BaseException]:
    try:
        step()
    except BaseException as e:  # noqa: BLE001 - reported by the test
        return [e]
    return []


def test_identifiers_are_checked():
    assert q("p_click") == '"p_click"'
    for bad in ['x"; DROP TABLE events; --', "1abc", "a b", ""]:
        with pytest.raises(ValueError):
            q(bad)


def test_unknown_url_is_a_clear_error():
    with pytest.raises(WarehouseError, match="not a URL"):
        open_warehouse("warehouse.duckdb")


def test_as_utc_converts_zoned_localizes_naive_and_parses_text():
    want = pd.Series(pd.to_datetime(["2026-01-31 23:00", "2026-02-01 00:30"]).tz_localize("UTC"))
    naive = want.dt.tz_localize(None)
    zoned = want.dt.tz_convert("America/New_York")
    text = pd.Series(["2026-01-31T23:00:00Z", "2026-02-01T01:30:00+01:00"])
    for values in (want, naive, zoned, text):
        got = as_utc(values)
        assert str(got.dt.tz) == "UTC"
        pd.testing.assert_series_equal(got.dt.as_unit("ns"), want.dt.as_unit("ns"))
