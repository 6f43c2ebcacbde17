"""Benchmark: the validate stage on a 1M-event ds partition (DuckDB warehouse, 7 trailing days of history)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 15.0


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus python {platform.python_version()}"


def emit(metric: str, value: float, unit: str, baseline: str | None = None, baseline_value: float | None = None) -> None:
    ratio = round(value / baseline_value, 3) if baseline_value else None
    print(json.dumps({"bench": "validation", "metric": metric, "value": round(value, 3), "unit": unit,
                      "baseline": baseline, "baseline_value": baseline_value, "ratio": ratio,
                      "machine": machine()}), flush=True)


def build(url_path: Path, ds: dt.date, events_per_day: int, days: int, users: int, items: int) -> None:
    """Raw tables in the contract's types, generated inside DuckDB (fast, deterministic)."""
    import duckdb

    con = duckdb.connect(str(url_path))
    con.execute("SET TimeZone = 'UTC'")
    start = ds - dt.timedelta(days=days - 1)
    con.execute(f"""
        CREATE TABLE events AS
        SELECT d.day::DATE AS ds,
               strftime(d.day, '%Y%m%d') || '-' || r.i::VARCHAR AS event_id,
               'u' || (hash(r.i, d.day) % {users})::VARCHAR AS user_id,
               'i' || (hash(r.i * 7, d.day) % {items})::VARCHAR AS item_id,
               (['home', 'search', 'video'])[1 + r.i % 3] AS scenario,
               (d.day + to_seconds((hash(r.i, 'ts') % 86400)::BIGINT))::TIMESTAMPTZ AS event_timestamp,
               CASE WHEN hash(r.i, d.day, 'c') % 100 < 10 THEN 1 ELSE 0 END::BIGINT AS click
        FROM range(DATE '{start}', DATE '{ds}' + INTERVAL 1 DAY, INTERVAL 1 DAY) d(day), range({events_per_day}) r(i)
    """)
    con.execute("""ALTER TABLE events ADD COLUMN "like" BIGINT""")
    con.execute("""UPDATE events SET "like" = CASE WHEN click = 1 AND hash(event_id) % 10 < 3 THEN 1 ELSE 0 END""")
    since = f"TIMESTAMPTZ '{ds - dt.timedelta(days=60)} 00:00:00+00'"
    con.execute(f"""CREATE TABLE users AS SELECT 'u' || i::VARCHAR AS user_id, {since} AS updated_at,
                    (18 + hash(i) % 50)::BIGINT AS age, (['de', 'fr', 'us', 'br'])[1 + (hash(i, 'c') % 4)::BIGINT] AS country
                    FROM range({users}) t(i)""")
    con.execute(f"""CREATE TABLE items AS SELECT 'i' || i::VARCHAR AS item_id, 'title ' || i::VARCHAR AS title,
                    {since} AS updated_at, (['news', 'sport', 'music'])[1 + (hash(i) % 3)::BIGINT] AS category,
                    (hash(i, 'p') % 1000)::DOUBLE / 10 AS price FROM range({items}) t(i)""")
    con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000, help="events in the validated partition")
    ap.add_argument("--history-days", type=int, default=7, help="trailing days before ds (same volume)")
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs (a rerun replaces the partition)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    ds = dt.date(2024, 5, 10)
    root = Path(tempfile.mkdtemp(prefix="mtrec-bench-validation-"))
    try:
        t0 = time.perf_counter()
        build(root / "wh.duckdb", ds, args.events, args.history_days + 1, args.users, args.items)
        emit("build_seconds", time.perf_counter() - t0, "s")

        t0 = time.perf_counter()
        import great_expectations  # noqa: F401 - the one-off import cost is reported on its own

        emit("gx_import_seconds", time.perf_counter() - t0, "s")

        from mtrec.config import load_config
        from mtrec.steps import validate
        from mtrec.warehouse import open_warehouse

        cfg = load_config(environ={}, overrides={"home": str(root / "home"),
                                                 "warehouse_url": f"duckdb:///{root / 'wh.duckdb'}"})
        best = None
        for i in range(args.repeat):
            wh = open_warehouse(cfg)
            try:
                t0 = time.perf_counter()
                res = validate.run(cfg, ds, run_id=f"bench-{i}", wh=wh)
                seconds = time.perf_counter() - t0
            finally:
                wh.close()
            best = seconds if best is None else min(best, seconds)
            emit("validate_seconds", seconds, "s", "target", TARGET_SECONDS)
            for part, sec in res.details.get("timings_seconds", {}).items():
                emit(f"{part}_seconds", sec, "s")
        emit("validate_events_per_second", args.events / best, "events/s")
        emit("checks", float(res.details["checks"]), "count")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
