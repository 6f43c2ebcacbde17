"""The real daily pipeline end to end on a tiny generated dataset (DuckDB, and PostgreSQL when configured)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pandas as pd
import pytest

from mtrec.config import load_config
from mtrec.data.generate import generate_into_warehouse
from mtrec.pipeline import run_pipeline
from mtrec.warehouse import open_warehouse

END = dt.date(2024, 5, 10)
CONTENT = ["ds", "scenario", "user_id", "rank", "item_id", "score", "p_click", "p_like", "model_version"]


def _config(tmp_path, url: str | None):
    overrides = {"home": str(tmp_path / "home"),
                 "training": {"epochs": 2, "train_days": 6, "batch_size": 512},
                 "scoring": {"top_k": 5}}
    if url:
        overrides["warehouse_url"] = url
    return load_config(environ={}, overrides=overrides)


def _partition(cfg, ds: dt.date) -> pd.DataFrame:
    wh = open_warehouse(cfg)
    try:
        df = wh.query_df("SELECT * FROM daily_recommendations WHERE ds = :d ORDER BY scenario, user_id, rank",
                         {"d": ds})
        active = wh.query_df(
            "SELECT DISTINCT scenario, user_id FROM events WHERE ds BETWEEN :a AND :b",
            {"a": ds - dt.timedelta(days=cfg.scoring.active_window_days - 1), "b": ds})
    finally:
        wh.close()
    df.attrs["active"] = active
    return df


def content_hash(df: pd.DataFrame) -> str:
    """Hash of what a reader consumes (write metadata run_id/created_at excluded)."""
    body = df[CONTENT].copy()
    body["ds"] = pd.to_datetime(body["ds"]).dt.date.astype(str)
    body[["score", "p_click", "p_like"]] = body[["score", "p_click", "p_like"]].round(9)
    return hashlib.sha256(body.to_csv(index=False).encode()).hexdigest()


def _check_partition(cfg, df: pd.DataFrame) -> None:
    k = cfg.scoring.top_k
    active = df.attrs["active"]
    assert len(df) > 0
    # every (scenario, active user) has exactly K rows ranked 1..K with distinct items
    got = df.groupby(["scenario", "user_id"]).agg(n=("rank", "size"), ranks=("rank", lambda r: sorted(r)),
                                                  items=("item_id", "nunique"))
    expected_keys = set(map(tuple, active[["scenario", "user_id"]].to_numpy()))
    assert set(got.index) == expected_keys
    assert (got["n"] == k).all()
    assert all(r == list(range(1, k + 1)) for r in got["ranks"])
    assert (got["items"] == k).all()
    # scores are sorted within each list
    assert (df.groupby(["scenario", "user_id"])["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
    assert df[["p_click", "p_like"]].notna().all().all()
    assert (df["p_like"] <= df["p_click"] + 1e-6).all()  # like depends on click


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["duckdb", "postgres"])
def test_daily_pipeline_end_to_end_and_rerun(tmp_path, request, backend):
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    cfg = _config(tmp_path, url)
    generate_into_warehouse(cfg, users=300, items=150, days=8, end_date=END, seed=3, progress=False)

    first = run_pipeline(cfg, END)
    assert first.status in ("success", "gated")
    manifest = json.loads(first.manifest.read_text())
    assert list(manifest["stages"])[:2] == ["validate", "features"]
    assert {"validate", "features", "train", "evaluate", "score", "publish"} <= set(manifest["stages"])
    df1 = _partition(cfg, END)
    _check_partition(cfg, df1)
    assert set(df1["scenario"]) == {"home", "search", "notify"}

    wh = open_warehouse(cfg)
    try:
        stages = wh.query_df("SELECT stage, status FROM pipeline_runs WHERE run_id = :r", {"r": first.run_id})
        champion = wh.query_df("SELECT version FROM model_registry WHERE status = 'champion'")
    finally:
        wh.close()
    assert set(stages["stage"]) >= {"validate", "features", "train", "evaluate", "score", "publish"}
    decision = first.stages["evaluate"].decision
    if decision == "blessed":  # the first candidate beat popularity: it is the champion and it scored
        assert first.status == "success" and champion["version"].tolist() == [first.stages["train"].version]
        assert set(df1["model_version"]) == {first.stages["train"].version}
    else:  # gated: no champion yet, so the lists come from the popularity fallback, and the run says so
        assert decision == "rejected" and first.status == "gated" and champion.empty
        assert set(df1["model_version"]) == {"popularity"}

    second = run_pipeline(cfg, END, retrain="never")
    df2 = _partition(cfg, END)
    assert second.run_id != first.run_id
    assert len(df2) == len(df1)
    assert content_hash(df2) == content_hash(df1)
    assert not df2.duplicated(["ds", "scenario", "user_id", "rank"]).any()
