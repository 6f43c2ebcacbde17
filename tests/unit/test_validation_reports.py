"""HTML helpers, the dq list/show queries, the index page and rerun-safe result rows."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrec.config import load_config
from mtrec.data.raw import load_frames
from mtrec.errors import DataValidationError
from mtrec.reports import html as H
from mtrec.reports.dq import list_days, show_day, write_index
from mtrec.steps import validate
from mtrec.validation.results import CheckResult, to_frame
from mtrec.warehouse import ensure_contract_tables, open_warehouse

END = dt.date(2024, 2, 20)


def test_html_escapes_everything_and_has_no_external_reference() -> None:
    evil = '<script>alert(1)</script><img src="https://x.example/p.png">'
    doc = H.page(evil, H.table([{"a": evil, "n": 3.14159}]) + H.bar_chart({evil: 2.0}) +
                 H.line_chart({evil: [(dt.date(2024, 1, 1), 1.0), (dt.date(2024, 1, 2), None),
                                      (dt.date(2024, 1, 3), 2.0)]}), subtitle=evil)
    assert "<script>" not in doc and "<img" not in doc
    # the URL survives only as escaped text, never as an attribute the browser would fetch
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", doc)
    assert "&lt;script&gt;" in doc and "3.14159" in doc
    assert doc.count("<svg") == 2


def test_line_chart_breaks_on_missing_values_and_marks_highlight() -> None:
    svg = H.line_chart({"s": [(1, 1.0), (2, 2.0), (3, None), (4, 3.0), (5, 4.0)]}, highlight_x=4)
    assert svg.count("<polyline") == 2  # the gap splits the line
    assert 'stroke-dasharray="3,3"' in svg
    assert "no data" in H.line_chart({"s": []}, title="empty")


def test_to_frame_keeps_worst_outcome_per_key() -> None:
    rows = [CheckResult("events", "unique", "event_id", "critical", True, "0 of 5 rows"),
            CheckResult("events", "unique", "event_id", "critical", False, "2 of 5 rows")]
    df = to_frame(rows, END, "r", dt.datetime(2024, 2, 21, tzinfo=dt.UTC))
    assert len(df) == 1 and not df["success"].iloc[0] and df["observed_value"].iloc[0] == "2 of 5 rows"


def _frames(day_count: int = 4, n: int = 600) -> dict[str, pd.DataFrame]:
    """One task only ('view'), one scenario, anonymous-looking user ids all present in users."""
    rng = np.random.default_rng(9)
    evs = []
    for k in range(day_count):
        d = END - dt.timedelta(days=day_count - 1 - k)
        evs.append(pd.DataFrame({
            "event_id": [f"{d}-{i}" for i in range(n)], "user_id": [f"anon-{j}" for j in rng.integers(0, 90, n)],
            "item_id": [f"sku{j}" for j in rng.integers(0, 40, n)], "scenario": "only",
            "event_timestamp": pd.Timestamp(d, tz="UTC") + pd.to_timedelta(rng.integers(0, 86_400, n), "s"),
            "view": (rng.random(n) < 0.3).astype(int)}))
    t0 = pd.Timestamp(END - dt.timedelta(days=10), tz="UTC")
    return {"events": pd.concat(evs, ignore_index=True),
            "users": pd.DataFrame({"user_id": [f"anon-{j}" for j in range(90)], "updated_at": t0}),
            "items": pd.DataFrame({"item_id": [f"sku{j}" for j in range(40)], "title": "t", "updated_at": t0})}


@pytest.fixture
def history(tmp_path: Path):
    cfg = load_config(environ={}, overrides={"home": str(tmp_path / "home"), "tasks": [{"name": "view"}]})
    wh = open_warehouse(cfg)
    ensure_contract_tables(wh, cfg)
    load_frames(wh, cfg, _frames())
    yield cfg, wh
    wh.close()


def test_list_and_show_days_with_statuses(history) -> None:
    cfg, wh = history
    d0, d1, d2 = (END - dt.timedelta(days=k) for k in (2, 1, 0))
    validate.run(cfg, d0, run_id="a", wh=wh)  # clean
    wh.execute("UPDATE events SET scenario = 'newcomer' WHERE ds = :d AND event_id LIKE :p", {"d": d1, "p": f"{d1}-1_"})
    res = validate.run(cfg, d1, run_id="b", wh=wh)  # warning only
    assert res.status == "success" and len(res.warnings) == 1 and "scenario_known" in res.warnings[0]
    wh.execute("UPDATE events SET view = 7 WHERE ds = :d AND event_id LIKE :p", {"d": d2, "p": f"{d2}-2_"})
    with pytest.raises(DataValidationError, match="label_values"):
        validate.run(cfg, d2, run_id="c", wh=wh)

    days = list_days(cfg, wh)
    assert days["ds"].tolist() == [d2, d1, d0]
    assert days["status"].tolist() == ["failed", "warning", "passed"]
    assert days["critical"].tolist()[0] >= 1 and days["warnings"].tolist()[1] == 1
    assert all(Path(p).exists() for p in days["report_path"])
    assert list_days(cfg, wh, limit=1)["ds"].tolist() == [d2]

    shown = show_day(cfg, wh, d2)
    assert list(shown.columns) == ["table", "expectation", "column", "severity", "success", "observed_value",
                                   "threshold"]
    assert not shown["success"].iloc[0] and shown["severity"].iloc[0] == "critical"
    first_pass = shown["success"].to_numpy().argmax()
    assert not shown["success"].iloc[:first_pass].any() and shown["success"].iloc[first_pass:].all()
    hit = shown[shown["expectation"] == "label_values"].iloc[0]
    assert "e.g. 7" in hit["observed_value"] and hit["threshold"] == "in {0, 1}"
    assert show_day(cfg, wh, END + dt.timedelta(days=5)).empty

    index = (cfg.reports_dir / "dq" / "index.html").read_text()
    assert index.index(d2.isoformat()) < index.index(d1.isoformat()) < index.index(d0.isoformat())
    payload = json.loads((cfg.reports_dir / "dq" / f"{d2}.json").read_text())
    assert payload["status"] == "failed" and payload["critical_failures"] >= 1
    assert any(r["expectation"] == "label_values" and not r["success"] for r in payload["results"])


def test_rerun_replaces_the_partition_and_index_stays_bounded(history) -> None:
    cfg, wh = history
    validate.run(cfg, END, run_id="first", wh=wh)
    n1 = wh.scalar("SELECT count(*) FROM data_quality_results WHERE ds = :d", {"d": END})
    validate.run(cfg, END, run_id="second", wh=wh)
    rows = wh.query_df("SELECT run_id FROM data_quality_results WHERE ds = :d", {"d": END})
    assert len(rows) == n1 and set(rows["run_id"]) == {"second"}
    # a long history: the index only lists the configured window
    old = wh.query_df("SELECT * FROM data_quality_results WHERE ds = :d", {"d": END})
    for k in range(1, 120):
        wh.insert_df("data_quality_results", old.assign(ds=END - dt.timedelta(days=k)))
    small = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"report_index_days": 30})})
    html = write_index(small, wh).read_text()
    assert html.count("<tr") == 1 + 30
    assert len(list_days(cfg, wh)) == 90


def test_data_docs_are_built_under_a_relative_home(tmp_path, monkeypatch, caplog) -> None:
    """The demo's home is relative (`.mtrec`); GX refuses a relative site directory, so it must be resolved."""
    import great_expectations.expectations as gxe

    from mtrec.validation.engine import Suite, run_suites

    monkeypatch.chdir(tmp_path)
    suite = Suite(name="events", frame=pd.DataFrame({"a": [1, 2, None]}), expectations=[
        gxe.ExpectColumnValuesToNotBeNull(column="a", meta={"check": "not_null", "table": "events", "column": "a"})])
    with caplog.at_level("WARNING"):
        out = run_suites([suite], data_docs_dir=Path("reports") / "data_docs")
    assert [(r.column, r.success) for r in out] == [("a", False)]
    assert "could not build" not in caplog.text
    assert (tmp_path / "reports" / "data_docs" / "index.html").exists()
