"""Catalogue of bad inputs: each corrupts one day and must fail the expected expectation with the expected severity."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrec.config import MtrecConfig, load_config
from mtrec.data.raw import load_frames
from mtrec.errors import DataValidationError
from mtrec.steps import validate
from mtrec.warehouse import Warehouse, ensure_contract_tables, open_warehouse
from mtrec.warehouse.base import normalize_frame

END = dt.date(2024, 5, 10)
DAYS = 8
PER_DAY = 1800
SCENARIOS = ["home", "search", "video"]


def clean_frames(cfg: MtrecConfig, *, days: int = DAYS, per_day: int = PER_DAY, scenarios: list[str] = SCENARIOS,
                 seed: int = 7, end: dt.date = END) -> dict[str, pd.DataFrame]:
    """Steady days of events (same volume, same label rates) plus users and items that cover every id."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 400, 150
    frames = []
    for k in range(days):
        d = end - dt.timedelta(days=days - 1 - k)
        ts = pd.Timestamp(d, tz="UTC") + pd.to_timedelta(rng.integers(0, 86_400, per_day), unit="s")
        ev = pd.DataFrame({
            "event_id": [f"{d:%Y%m%d}-{i}" for i in range(per_day)],
            "user_id": [f"u{j}" for j in rng.integers(0, n_users, per_day)],
            "item_id": [f"i{j}" for j in rng.integers(0, n_items, per_day)],
            "scenario": [scenarios[i % len(scenarios)] for i in range(per_day)],
            "event_timestamp": ts,
        })
        parent: np.ndarray | None = None
        for t in cfg.tasks:
            base = (rng.random(per_day) < 0.12).astype(int)
            if t.depends_on:
                base = ev[t.depends_on].to_numpy() * (rng.random(per_day) < 0.3).astype(int)
            ev[t.name] = base
            parent = base
        assert parent is not None
        frames.append(ev)
    since = pd.Timestamp(end - dt.timedelta(days=40), tz="UTC")
    users = pd.DataFrame({"user_id": [f"u{j}" for j in range(n_users)], "updated_at": since,
                          "age": rng.integers(18, 70, n_users), "country": rng.choice(["de", "fr", "us"], n_users)})
    # a few profiles updated on the last day, so the users suite sees rows of ds
    upd = users.sample(20, random_state=1).assign(updated_at=pd.Timestamp(end, tz="UTC") + pd.Timedelta(hours=3))
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(n_items)], "title": [f"item {j}" for j in range(n_items)],
                          "updated_at": since, "category": rng.choice(["news", "sport", "music"], n_items)})
    return {"events": pd.concat(frames, ignore_index=True), "users": pd.concat([users, upd], ignore_index=True),
            "items": items}


def seed_warehouse(cfg: MtrecConfig, wh: Warehouse, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Load clean raw data and a daily_recommendations partition written before validation (must stay as is)."""
    ensure_contract_tables(wh, cfg)
    load_frames(wh, cfg, frames)
    recs = pd.DataFrame({"ds": [END - dt.timedelta(days=1)] * 3, "scenario": ["home"] * 3, "user_id": ["u1"] * 3,
                         "rank": [1, 2, 3], "item_id": ["i1", "i2", "i3"], "score": [0.9, 0.8, 0.7],
                         "model_version": "v0", "run_id": "earlier", "created_at": pd.Timestamp("2024-05-10", tz="UTC")})
    for t in cfg.task_names:
        recs[f"p_{t}"] = 0.5
    from mtrec.schema import recommendations_spec
    wh.insert_df("daily_recommendations", normalize_frame(recs, recommendations_spec(cfg).columns))
    return snapshot(wh)


def snapshot(wh: Warehouse) -> pd.DataFrame:
    return wh.query_df("SELECT * FROM daily_recommendations ORDER BY ds, scenario, user_id, rank")


# -- corruptions of day END (SQL straight into the warehouse, as another tool would write) -------------

def _drop_item_id(wh: Warehouse) -> None:
    wh.execute("ALTER TABLE events DROP COLUMN item_id")


def _string_timestamps(wh: Warehouse) -> None:
    wh.execute("CREATE TABLE events_s AS SELECT * REPLACE (strftime(event_timestamp, '%Y-%m-%d %H:%M:%S') "
               "AS event_timestamp) FROM events")
    wh.execute("DROP TABLE events")
    wh.execute("ALTER TABLE events_s RENAME TO events")


def _some(where: str = "", n: int = 5) -> str:
    return (f"event_id IN (SELECT event_id FROM events WHERE ds = DATE '{END}' {where} "
            f"ORDER BY event_id LIMIT {n})")


def _null_user(wh: Warehouse) -> None:
    wh.execute(f"UPDATE events SET user_id = NULL WHERE {_some()}")


def _duplicate_event_id(wh: Warehouse) -> None:
    wh.execute(f"UPDATE events SET event_id = '{END:%Y%m%d}-0' WHERE {_some('AND event_id <> ' + repr(f'{END:%Y%m%d}-0'), 3)}")


def _label_two(wh: Warehouse) -> None:
    wh.execute(f"UPDATE events SET click = 2 WHERE {_some()}")


def _like_without_click(wh: Warehouse) -> None:
    wh.execute(f'UPDATE events SET "like" = 1, click = 0 WHERE {_some()}')


def _other_day(wh: Warehouse) -> None:
    wh.execute(f"UPDATE events SET event_timestamp = event_timestamp - INTERVAL 1 DAY WHERE {_some(n=40)}")


def _future(wh: Warehouse) -> None:
    wh.execute(f"UPDATE events SET event_timestamp = event_timestamp + INTERVAL 3 DAY WHERE {_some(n=40)}")


def _empty(wh: Warehouse) -> None:
    wh.execute("DELETE FROM events WHERE ds = :d", {"d": END})


def _unknown_scenario(wh: Warehouse) -> None:
    wh.execute(f"UPDATE events SET scenario = 'brand_new' WHERE {_some(n=30)}")


def _unknown_items(wh: Warehouse) -> None:
    wh.execute("UPDATE events SET item_id = 'ghost_' || event_id WHERE ds = :d AND hash(event_id) % 10 < 3",
               {"d": END})


def _volume_spike(wh: Warehouse) -> None:
    for k in range(1, 10):
        wh.execute(f"INSERT INTO events SELECT * REPLACE (event_id || '-x{k}' AS event_id) FROM events "
                   "WHERE ds = :d AND event_id NOT LIKE '%-x%'", {"d": END})


def _click_collapse(wh: Warehouse) -> None:
    wh.execute("UPDATE events SET click = 0, \"like\" = 0 WHERE ds = :d AND scenario = 'search'", {"d": END})


def _duplicate_user_version(wh: Warehouse) -> None:
    wh.execute("INSERT INTO users SELECT * FROM users WHERE updated_at >= :d LIMIT 2",
               {"d": pd.Timestamp(END, tz="UTC").to_pydatetime()})


def _null_item_in_items(wh: Warehouse) -> None:
    wh.execute("UPDATE items SET item_id = NULL WHERE item_id IN ('i1', 'i2')")
    wh.execute("UPDATE items SET updated_at = :t WHERE item_id IS NULL",
               {"t": pd.Timestamp(END, tz="UTC").to_pydatetime()})


# (name, corruption, (table, expectation, column, severity)); critical cases must stop the stage
CATALOGUE: list[tuple[str, Callable[[Warehouse], None], tuple[str, str, str, str]]] = [
    ("missing column", _drop_item_id, ("events", "column_exists", "item_id", "critical")),
    ("string timestamps", _string_timestamps, ("events", "column_type", "event_timestamp", "critical")),
    ("null user_id", _null_user, ("events", "not_null", "user_id", "critical")),
    ("duplicate event_id", _duplicate_event_id, ("events", "unique", "event_id", "critical")),
    ("label 2", _label_two, ("events", "label_values", "click", "critical")),
    ("like without click", _like_without_click, ("events", "implies_click", "like", "critical")),
    ("events from another day", _other_day, ("events", "timestamp_in_partition", "event_timestamp", "critical")),
    ("future timestamps", _future, ("events", "timestamp_not_in_future", "event_timestamp", "critical")),
    ("empty partition", _empty, ("events", "row_count_min", "", "critical")),
    ("unknown scenario", _unknown_scenario, ("events", "scenario_known", "scenario", "warning")),
    ("unknown items", _unknown_items, ("events", "unknown_items_ratio[critical]", "item_id", "critical")),
    ("10x volume spike", _volume_spike, ("events", "row_count_vs_trailing_median[critical]", "", "critical")),
    ("click-rate collapse", _click_collapse, ("events", "label_rate_vs_trailing[critical]", "click@search",
                                              "critical")),
    ("duplicate user version", _duplicate_user_version, ("users", "unique", "user_id,updated_at", "critical")),
    ("null item id", _null_item_in_items, ("items", "not_null", "item_id", "critical")),
]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """One clean warehouse file per module; every case works on its own copy."""
    root = tmp_path_factory.mktemp("dq_seed")
    cfg = load_config(environ={}, overrides={"home": str(root / "home")})
    wh = open_warehouse(f"duckdb:///{root / 'wh.duckdb'}")
    try:
        recs = seed_warehouse(cfg, wh, clean_frames(cfg))
    finally:
        wh.close()
    return root / "wh.duckdb", recs


def _case_cfg(tmp_path: Path, seeded: tuple[Path, pd.DataFrame]) -> MtrecConfig:
    shutil.copy(seeded[0], tmp_path / "wh.duckdb")
    return load_config(environ={}, overrides={"home": str(tmp_path / "home"),
                                              "warehouse_url": f"duckdb:///{tmp_path / 'wh.duckdb'}"})


def test_clean_day_passes_without_warnings(tmp_path: Path, seeded) -> None:
    cfg = _case_cfg(tmp_path, seeded)
    res = validate.run(cfg, END, run_id="clean")
    assert res.status == "success"
    assert res.warnings == []
    assert not res.drift_detected
    wh = open_warehouse(cfg)
    try:
        rows = wh.query_df("SELECT * FROM data_quality_results WHERE ds = :d", {"d": END})
    finally:
        wh.close()
    assert rows["success"].all()
    assert {"events", "users", "items"} <= set(rows["table_name"])
    assert len(rows) >= 40


@pytest.mark.parametrize("name,corrupt,expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_caught(tmp_path: Path, seeded, name: str, corrupt, expected) -> None:
    cfg = _case_cfg(tmp_path, seeded)
    table, expectation, column, severity = expected
    wh = open_warehouse(cfg)
    try:
        corrupt(wh)
        run_id = f"case-{name.replace(' ', '-')}"
        if severity == "critical":
            with pytest.raises(DataValidationError) as err:
                validate.run(cfg, END, run_id=run_id, wh=wh)
            msg = str(err.value)
            assert "\n" not in msg and f"date {END}" in msg and "report:" in msg
        else:
            res = validate.run(cfg, END, run_id=run_id, wh=wh)
            assert any(expectation in w for w in res.warnings), res.warnings
        rows = wh.query_df("SELECT * FROM data_quality_results WHERE ds = :d", {"d": END})
        hit = rows[(rows["table_name"] == table) & (rows["expectation"] == expectation)
                   & (rows["column_name"] == column)]
        assert len(hit) == 1, rows[~rows["success"]][["table_name", "expectation", "column_name"]]
        assert not bool(hit["success"].iloc[0])
        assert hit["severity"].iloc[0] == severity
        assert hit["observed_value"].iloc[0]
        if severity == "critical":
            # the summary names one of the failed critical expectations, with its observed value
            crit = rows[(~rows["success"]) & (rows["severity"] == "critical")]
            assert any(e in msg and o[:20] in msg for e, o in zip(crit["expectation"], crit["observed_value"],
                                                                    strict=True))
            # nothing downstream: the run holds only the failed validate stage, earlier recommendations stay
            runs = wh.query_df("SELECT stage, status FROM pipeline_runs WHERE run_id = :r", {"r": run_id})
            assert runs.to_dict("records") == [{"stage": "validate", "status": "failed"}]
            pd.testing.assert_frame_equal(snapshot(wh), seeded[1])
            assert not wh.query_df("SELECT * FROM daily_recommendations WHERE ds = :d", {"d": END}).shape[0]
        else:
            assert not rows[(~rows["success"]) & (rows["severity"] == "critical")].shape[0]
    finally:
        wh.close()
    from mtrec.reports.dq import json_path, report_path
    assert report_path(cfg, END).exists() and json_path(cfg, END).exists()
