"""The validate stage on PostgreSQL: a clean day passes; text timestamps, a label collapse and drift are caught."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mtrec.config import load_config
from mtrec.errors import DataValidationError
from mtrec.reports.dq import list_days, show_day
from mtrec.steps import validate
from mtrec.warehouse import open_warehouse
from tests.integration.test_validation_catalogue import END, clean_frames, seed_warehouse, snapshot

pytestmark = pytest.mark.services


@pytest.fixture
def pg(tmp_path: Path, postgres_url: str):
    cfg = load_config(environ={}, overrides={"home": str(tmp_path / "home"), "warehouse_url": postgres_url})
    wh = open_warehouse(cfg)
    recs = seed_warehouse(cfg, wh, clean_frames(cfg, days=6, per_day=1200))
    yield cfg, wh, recs
    wh.close()


def test_postgres_clean_then_broken(pg) -> None:
    cfg, wh, recs = pg
    res = validate.run(cfg, END, run_id="pg-clean", wh=wh)
    assert res.status == "success" and res.warnings == []
    assert list_days(cfg, wh)["status"].tolist() == ["passed"]

    wh.execute("UPDATE events SET click = 0, \"like\" = 0 WHERE ds = :d AND scenario = 'video'", {"d": END})
    with pytest.raises(DataValidationError, match=r"label_rate_vs_trailing\[critical\]"):
        validate.run(cfg, END, run_id="pg-collapse", wh=wh)
    shown = show_day(cfg, wh, END)
    assert {"click@video", "like@video"} <= set(shown[~shown["success"]]["column"])

    wh.execute("ALTER TABLE events ALTER COLUMN event_timestamp TYPE TEXT "
               "USING to_char(event_timestamp, 'YYYY-MM-DD HH24:MI:SS')")
    with pytest.raises(DataValidationError):
        validate.run(cfg, END, run_id="pg-text", wh=wh)
    rows = wh.query_df("SELECT * FROM data_quality_results WHERE ds = :d AND NOT success", {"d": END})
    hit = rows[(rows["expectation"] == "column_type") & (rows["column_name"] == "event_timestamp")]
    assert len(hit) == 1 and hit["severity"].iloc[0] == "critical"
    runs = wh.query_df("SELECT stage, status FROM pipeline_runs WHERE run_id = 'pg-text'")
    assert runs.to_dict("records") == [{"stage": "validate", "status": "failed"}]
    pd.testing.assert_frame_equal(snapshot(wh), recs)
    assert not validate.drift_flag(cfg, wh, END)
