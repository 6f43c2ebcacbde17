"""Small in-memory FeatureTables with a planted signal, for model tests and DDP smoke runs (no warehouse)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtrec.features.frame import FeatureTable, ItemEmbeddings


def toy_table(n: int = 4000, *, seed: int = 0, users: int = 200, items: int = 60,
              scenarios: tuple[str, ...] = ("home", "search"), text_dim: int = 8, seq_len: int = 5,
              day: str = "2024-01-01", signal: float = 2.5, like_missing: float = 0.0) -> FeatureTable:
    """Impressions whose click depends on an item attribute, the user's tenure, the item's title vector and
    the scenario; `like` (depends on click) on the item's quality. Labels are Bernoulli draws, so a model that
    learns the signal gets a clearly higher AUC than one that does not."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    i = rng.integers(0, items, n)
    s = rng.integers(0, len(scenarios), n)
    item_cat = np.array(["a", "b", "c"])[np.arange(items) % 3]
    quality = np.random.default_rng(1000).normal(size=items)  # fixed across seeds: the same items
    title = np.random.default_rng(1001).normal(size=(items, text_dim)).astype(np.float32)
    tenure = np.random.default_rng(1002).gamma(2.0, 50.0, size=users)
    user_cat = np.array(["x", "y"])[np.arange(users) % 2]
    logit = (-1.0 + signal * 0.5 * quality[i] + signal * 0.4 * (item_cat[i] == "a") + 0.3 * (s == 1)
             + signal * 0.3 * np.tanh(title[i, 0]) + 0.2 * np.log1p(tenure[u]) / 5)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    like_given = 1 / (1 + np.exp(-(signal * 0.6 * quality[i] - 0.5)))
    like = click * (rng.random(n) < like_given)
    if like_missing:
        like = np.where(rng.random(n) < like_missing, np.nan, like)
    frame = pd.DataFrame({
        "user_id": [f"u{x}" for x in u], "item_id": [f"i{x}" for x in i],
        "scenario": np.array(scenarios, dtype=object)[s], "ds": pd.Timestamp(day).date(),
        "feature_time": pd.Timestamp(day, tz="UTC"), "click": click, "like": like,
        "u_segment": user_cat[u], "u_tenure_days": tenure[u], "i_category": item_cat[i],
        "is_click_rate_7d": 1 / (1 + np.exp(-(quality[i] + rng.normal(0, 1.0, n)))),
    })
    seq = np.array([f"i{x}" for x in rng.integers(0, items, n * seq_len)], dtype=object).reshape(n, seq_len)
    seq[rng.random((n, seq_len)) < 0.3] = ""
    emb = ItemEmbeddings(item_ids=[f"i{x}" for x in range(items)], vectors=title,
                         missing=np.zeros(items, dtype=bool), encoder_id="toy")
    return FeatureTable(frame=frame, tasks=["click", "like"], user_categorical=["u_segment"],
                        user_numeric=["u_tenure_days"], item_categorical=["i_category"],
                        item_numeric=["is_click_rate_7d"], sequences=seq, item_embeddings=emb)
