"""Suites follow the config (tasks, dependencies, scenarios) and survive broken tables without crashing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrec.config import load_config
from mtrec.data.raw import load_frames
from mtrec.errors import DataValidationError
from mtrec.steps import validate
from mtrec.validation.plan import validate_partition
from mtrec.warehouse import open_warehouse

DAY = dt.date(2024, 9, 1)
TASKS = [{"name": "watch"}, {"name": "share", "depends_on": "watch"}, {"name": "save"}]


def _events(n: int = 300, day: dt.date = DAY) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    ev = pd.DataFrame({"event_id": [f"e{i}" for i in range(n)], "user_id": [f"u{j}" for j in rng.integers(0, 30, n)],
                       "item_id": [f"i{j}" for j in rng.integers(0, 10, n)], "scenario": "tv",
                       "event_timestamp": pd.Timestamp(day, tz="UTC") + pd.Timedelta(hours=5),
                       "watch": (rng.random(n) < 0.5).astype(int), "save": (rng.random(n) < 0.1).astype(int)})
    ev["share"] = ev["watch"] * (rng.random(n) < 0.2).astype(int)
    return ev


def _entities() -> dict[str, pd.DataFrame]:
    t0 = pd.Timestamp(DAY - dt.timedelta(days=3), tz="UTC")
    return {"users": pd.DataFrame({"user_id": [f"u{j}" for j in range(30)], "updated_at": t0}),
            "items": pd.DataFrame({"item_id": [f"i{j}" for j in range(10)], "title": "t", "updated_at": t0})}


def test_dependencies_come_from_config_and_first_day_skips_history_checks(tmp_path: Path) -> None:
    cfg = load_config(environ={}, overrides={"home": str(tmp_path / "h"), "tasks": TASKS})
    wh = open_warehouse(cfg)
    try:
        load_frames(wh, cfg, {"events": _events(), **_entities()})
        out = validate_partition(cfg, wh, DAY)
        names = {(r.expectation, r.column) for r in out.results}
        assert ("implies_watch", "share") in names
        assert not any(e.startswith("implies_click") or c == "like" for e, c in names)
        assert {("label_values", t["name"]) for t in TASKS} <= names
        assert out.critical == [] and out.warnings == []
        # no earlier day: trailing checks are recorded as skipped, not failed
        skipped = [r for r in out.results if "skipped" in r.observed]
        assert {r.expectation.split("[")[0] for r in skipped} >= {"row_count_vs_trailing_median", "scenario_known"}
        # save is independent: save = 1 without watch is fine, share = 1 without watch is not
        wh.execute("UPDATE events SET save = 1, watch = 0, share = 0 WHERE event_id IN ('e1', 'e2')")
        assert validate_partition(cfg, wh, DAY).critical == []
        wh.execute("UPDATE events SET share = 1, watch = 0 WHERE event_id = 'e3'")
        crit = validate_partition(cfg, wh, DAY).critical
        assert [(r.expectation, r.column) for r in crit] == [("implies_watch", "share")]
        assert crit[0].observed.startswith("1 of 300 rows")
    finally:
        wh.close()


def test_missing_tables_and_partition_column_fail_critically(tmp_path: Path) -> None:
    cfg = load_config(environ={}, overrides={"home": str(tmp_path / "h"), "tasks": TASKS})
    wh = open_warehouse(cfg)
    try:
        with pytest.raises(DataValidationError, match="table events, date 2024-09-01: critical expectation "
                                                      "table_exists failed: observed missing"):
            validate.run(cfg, DAY, run_id="nothing", wh=wh)
        wh.execute("CREATE TABLE events (event_id VARCHAR, user_id BIGINT)")  # written by another tool
        load_frames(wh, cfg, _entities())
        out = validate_partition(cfg, wh, DAY)
        failed = {(r.table, r.expectation, r.column) for r in out.critical}
        assert ("events", "column_exists", "ds") in failed
        assert not any(r.table in ("users", "items") for r in out.critical)
    finally:
        wh.close()


def test_wrong_id_type_is_a_type_failure_not_a_crash(tmp_path: Path) -> None:
    cfg = load_config(environ={}, overrides={"home": str(tmp_path / "h"), "tasks": TASKS})
    wh = open_warehouse(cfg)
    try:
        load_frames(wh, cfg, {"events": _events(), **_entities()})
        wh.execute("CREATE TABLE e2 AS SELECT * REPLACE (CAST(substr(user_id, 2) AS BIGINT) AS user_id) FROM events")
        wh.execute("DROP TABLE events")
        wh.execute("ALTER TABLE e2 RENAME TO events")
        crit = validate_partition(cfg, wh, DAY).critical
        assert ("column_type", "user_id") in {(r.expectation, r.column) for r in crit}
    finally:
        wh.close()
