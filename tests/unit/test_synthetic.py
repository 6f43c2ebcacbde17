"""The synthetic generator: deterministic, contract-shaped, realistic enough to tell models apart."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from mtrec.data.synthetic import GeneratorSpec, generate

END = dt.date(2024, 5, 10)


def _all(spec: GeneratorSpec) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    batches = list(generate(spec))
    cat = lambda name: pd.concat([getattr(b, name) for b in batches], ignore_index=True)  # noqa: E731
    return cat("events"), cat("users"), cat("items"), cat("truth")


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    r = pd.Series(p).rank().to_numpy()
    n1 = y.sum()
    n0 = len(y) - n1
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_same_seed_same_data_other_seed_differs():
    a = _all(GeneratorSpec(end_date=END, users=300, items=100, days=4, seed=7))
    b = _all(GeneratorSpec(end_date=END, users=300, items=100, days=4, seed=7))
    c = _all(GeneratorSpec(end_date=END, users=300, items=100, days=4, seed=8))
    for x, y in zip(a, b, strict=True):
        pd.testing.assert_frame_equal(x, y)
    assert not a[0]["item_id"].equals(c[0]["item_id"].iloc[: len(a[0])]) or len(a[0]) != len(c[0])


def test_contract_shape_and_consistency():
    events, users, items, truth = _all(GeneratorSpec(end_date=END, users=400, items=150, days=5))
    assert list(events.columns[:7]) == ["event_id", "user_id", "item_id", "scenario", "event_timestamp", "click", "like"]
    assert events["event_id"].is_unique
    assert ((events["like"] == 1) <= (events["click"] == 1)).all()  # like only after click
    assert str(events["event_timestamp"].dt.tz) == "UTC"
    days = events["event_timestamp"].dt.date
    assert days.min() == END - dt.timedelta(days=4) and days.max() == END
    assert set(events["user_id"]) <= set(users["user_id"]) and set(events["item_id"]) <= set(items["item_id"])
    first_seen = events.groupby("user_id")["event_timestamp"].min()
    created = users.set_index("user_id")["updated_at"]
    assert (created.loc[first_seen.index] <= first_seen).all()
    assert truth["event_id"].equals(events["event_id"])
    assert ((truth["p_like"] <= truth["p_click"]) & truth["p_click"].between(0, 1)).all()
    assert items["title"].str.split().str.len().between(3, 8).all()


def test_scenarios_differ_and_small_scenario_share():
    events, *_ = _all(GeneratorSpec(end_date=END, days=6, scenarios=("feed", "query", "push")))
    share = events["scenario"].value_counts(normalize=True)
    assert 0.05 <= share["push"] <= 0.10
    ctr = events.groupby("scenario")["click"].mean()
    assert ctr["query"] > ctr["feed"] > ctr["push"]


def test_signal_cold_start_and_new_entities_every_day():
    spec = GeneratorSpec(end_date=END, days=8)
    batches = list(generate(spec))
    assert all(len(b.users) > 0 and len(b.items) > 0 for b in batches)
    events = pd.concat([b.events for b in batches], ignore_index=True)
    truth = pd.concat([b.truth for b in batches], ignore_index=True)
    assert _auc(events["click"].to_numpy(), truth["p_click"].to_numpy()) > 0.65
    assert _auc(events["like"].to_numpy(), truth["p_like"].to_numpy()) > 0.65
    first_day = events.groupby("user_id")["event_timestamp"].transform("min").dt.date
    late = events["event_timestamp"].dt.date >= END - dt.timedelta(days=3)
    cold_share = (first_day == events["event_timestamp"].dt.date)[late].mean()
    assert cold_share > 0.25


def test_large_days_stream_in_bounded_chunks():
    spec = GeneratorSpec(end_date=END, users=3000, items=200, days=2, chunk_events=5000)
    sizes = [len(b.events) for b in generate(spec)]
    assert max(sizes) <= 5000 and len(sizes) > 2
