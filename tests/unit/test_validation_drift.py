"""Drift measures (PSI, Jensen-Shannon), attribute binning, and the drift flag the retrain policy reads."""

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
from mtrec.validation.drift import _bins, attribute_columns, jensen_shannon, psi
from mtrec.warehouse import open_warehouse

END = dt.date(2024, 7, 1)


def test_psi_and_js_are_zero_for_identical_and_grow_with_shift() -> None:
    a = np.array([100, 200, 300, 400], dtype=float)
    assert psi(a, a) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon(a, a * 3) == pytest.approx(0.0, abs=1e-12)
    small, large = np.array([110, 190, 300, 400.0]), np.array([400, 300, 200, 100.0])
    assert 0 < psi(a, small) < psi(a, large)
    assert 0 < jensen_shannon(a, small) < jensen_shannon(a, large) <= 1.0
    # a category that vanishes does not make PSI infinite
    assert np.isfinite(psi(a, np.array([0, 200, 300, 400.0])))


def test_numeric_bins_follow_reference_quantiles_and_keep_nulls() -> None:
    rng = np.random.default_rng(0)
    ref = pd.Series(rng.normal(0, 1, 2000))
    cur = pd.Series(np.append(rng.normal(0, 1, 1990), [np.nan] * 10))
    e, a, labels = _bins("numeric", ref, pd.Series(np.ones(2000)), cur, pd.Series(np.ones(2000)), 10)
    assert len(e) == len(a) == len(labels) == 11  # 10 quantile bins + null
    assert e[:-1].min() > 150 and a[-1] == 10  # reference deciles hold ~200 each
    shifted = pd.Series(rng.normal(1.5, 1, 2000))
    _, s, _ = _bins("numeric", ref, pd.Series(np.ones(2000)), shifted, pd.Series(np.ones(2000)), 10)
    assert psi(e, s) > 0.25 > psi(e, a)


def test_attribute_columns_inferred_or_from_config() -> None:
    types = {"user_id": "VARCHAR", "updated_at": "TIMESTAMP WITH TIME ZONE", "age": "BIGINT", "tier": "VARCHAR",
             "ds": "DATE"}
    cfg = load_config(environ={})
    assert attribute_columns(cfg, "users", types) == {"age": "numeric", "tier": "categorical"}
    cfg = load_config(environ={}, overrides={"features": {"user_categorical": ["tier"]}})
    assert attribute_columns(cfg, "users", types) == {"tier": "categorical"}


def _frames(shift: bool) -> dict[str, pd.DataFrame]:
    """Users with a 'plan' attribute; on the last day the active population moves to other users (plan b)."""
    rng = np.random.default_rng(5)
    evs = []
    for k in range(6):
        d = END - dt.timedelta(days=5 - k)
        n = 1200
        pool = np.arange(200, 400) if (shift and d == END) else np.arange(0, 200)
        evs.append(pd.DataFrame({
            "event_id": [f"{d}-{i}" for i in range(n)], "user_id": [f"u{j}" for j in rng.choice(pool, n)],
            "item_id": [f"i{j}" for j in rng.integers(0, 50, n)], "scenario": ["a", "b"] * (n // 2),
            "event_timestamp": pd.Timestamp(d, tz="UTC") + pd.to_timedelta(rng.integers(0, 86_400, n), "s"),
            "click": (rng.random(n) < 0.1).astype(int)}))
    t0 = pd.Timestamp(END - dt.timedelta(days=20), tz="UTC")
    users = pd.DataFrame({"user_id": [f"u{j}" for j in range(400)], "updated_at": t0,
                          "plan": ["basic"] * 200 + ["premium"] * 200})
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(50)], "title": "t", "updated_at": t0})
    return {"events": pd.concat(evs, ignore_index=True), "users": users, "items": items}


@pytest.mark.parametrize("metric", ["psi", "js"])
def test_population_shift_flags_drift_as_warning(tmp_path: Path, metric: str) -> None:
    cfg = load_config(environ={}, overrides={"home": str(tmp_path / "home"), "tasks": [{"name": "click"}],
                                             "validation": {"drift_metric": metric}})
    wh = open_warehouse(cfg)
    try:
        load_frames(wh, cfg, _frames(shift=True))
        res = validate.run(cfg, END, run_id="drift", wh=wh)
        assert res.drift_detected and validate.drift_flag(cfg, wh, END)
        assert any("attribute_drift[critical]" in w and "users.plan" in w for w in res.warnings)
        assert not validate.drift_flag(cfg, wh, END - dt.timedelta(days=1))  # nothing recorded that day
        off = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"drift_triggers_retrain": False})})
        assert not validate.drift_flag(off, wh, END)
    finally:
        wh.close()


def test_no_shift_no_drift_and_critical_severity_stops(tmp_path: Path) -> None:
    cfg = load_config(environ={}, overrides={"home": str(tmp_path / "home"), "tasks": [{"name": "click"}]})
    wh = open_warehouse(cfg)
    try:
        load_frames(wh, cfg, _frames(shift=False))
        res = validate.run(cfg, END, run_id="steady", wh=wh)
        assert not res.drift_detected and not validate.drift_flag(cfg, wh, END)
        load_frames(wh, cfg, _frames(shift=True))
        strict = load_config(environ={}, overrides={"home": str(tmp_path / "home"), "tasks": [{"name": "click"}],
                                                    "validation": {"drift_severity": "critical"}})
        with pytest.raises(DataValidationError, match=r"table users, column plan, .*attribute_drift\[critical\]"):
            validate.run(strict, END, run_id="strict", wh=wh)
        assert validate.drift_flag(strict, wh, END)
    finally:
        wh.close()
