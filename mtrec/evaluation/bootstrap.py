"""Paired, user-clustered bootstrap of AUC, log loss and GAUC: one set of resamples shared by every model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

EPS = 1e-7
HIGHER_IS_BETTER = {"auc": True, "gauc": True, "logloss": False}


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC under row weights, for many weight vectors at once (ties count one half).

    scores, labels: [n]; weights: [B, n]. Returns [B] (NaN where a class has zero weight).
    """
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(bool)
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each group of tied scores
    pos = np.add.reduceat(np.where(y, w, 0.0), starts, axis=1)  # [B, G]
    neg = np.add.reduceat(np.where(y, 0.0, w), starts, axis=1)  # [B, G]
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_logloss(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    p = np.clip(probs.astype(np.float64), EPS, 1 - EPS)
    ll = -(labels * np.log(p) + (1 - labels) * np.log1p(-p))
    tot = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, (weights * ll).sum(axis=1) / tot, np.nan)


def per_user_auc(scores: np.ndarray, labels: np.ndarray, user_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user code, impressions, AUC) for users with both a positive and a negative impression."""
    df = pd.DataFrame({"u": user_codes, "s": scores, "y": labels.astype(np.int64)})
    df = df[df["u"] >= 0]
    df["r"] = df.groupby("u")["s"].rank(method="average")
    df["r_pos"] = np.where(df["y"] == 1, df["r"], 0.0)
    g = df.groupby("u").agg(n=("y", "size"), npos=("y", "sum"), rpos=("r_pos", "sum"))
    g["nneg"] = g["n"] - g["npos"]
    g = g[(g["npos"] > 0) & (g["nneg"] > 0)]
    auc = (g["rpos"] - g["npos"] * (g["npos"] + 1) / 2) / (g["npos"] * g["nneg"])
    return g.index.to_numpy(), g["n"].to_numpy(np.float64), auc.to_numpy(np.float64)


@dataclass
class Resamples:
    """Cluster bootstrap over users: replicate b draws users with replacement; row weight = draws of its user.

    Rows of anonymous users (empty or null id) are their own clusters. The same counts serve every model
    and every slice, so differences between models are paired and slices share one resampling.
    """

    cluster: np.ndarray  # [N] cluster code per holdout row
    user: np.ndarray  # [N] user code per row, -1 for anonymous rows (excluded from GAUC)
    counts: np.ndarray  # [B, C] float32 draws of each cluster in each replicate

    @classmethod
    def draw(cls, user_ids: pd.Series | np.ndarray, n_samples: int, seed: int) -> Resamples:
        ids = pd.Series(np.asarray(user_ids, dtype=object))
        anonymous = ids.isna() | (ids.astype(str).str.len() == 0)
        user = np.full(len(ids), -1, dtype=np.int64)
        codes, _ = pd.factorize(ids[~anonymous])
        user[~anonymous.to_numpy()] = codes
        n_users = int(codes.max()) + 1 if len(codes) else 0
        cluster = user.copy()
        cluster[anonymous.to_numpy()] = n_users + np.arange(int(anonymous.sum()))
        n_clusters = n_users + int(anonymous.sum())
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / max(n_clusters, 1)),
                                 size=n_samples).astype(np.float32) if n_clusters else np.zeros((n_samples, 0))
        return cls(cluster=cluster, user=user, counts=counts)

    @property
    def n_samples(self) -> int:
        return int(self.counts.shape[0])

    def row_weights(self, rows: np.ndarray) -> np.ndarray:
        """[B, len(rows)] weights of the given holdout rows in each replicate."""
        return self.counts[:, self.cluster[rows]]


def metric_replicates(metric: str, probs: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                      rs: Resamples) -> tuple[float, np.ndarray]:
    """(point estimate on the holdout, [B] replicates) of one metric on the rows of one slice."""
    p, y = probs[rows].astype(np.float64), labels[rows].astype(np.float64)
    if metric == "auc":
        return float(weighted_auc(p, y, np.ones((1, len(rows))))[0]), weighted_auc(p, y, rs.row_weights(rows))
    if metric == "logloss":
        return float(weighted_logloss(p, y, np.ones((1, len(rows))))[0]), weighted_logloss(p, y, rs.row_weights(rows))
    if metric == "gauc":
        users, n, auc = per_user_auc(p, y, rs.user[rows])
        if len(users) == 0:
            return float("nan"), np.full(rs.n_samples, np.nan)
        point = float((n * auc).sum() / n.sum())
        # users (not anonymous) are clusters 0..U-1, so their draws are the first columns of counts
        c = rs.counts[:, users] * n
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = (c * auc).sum(axis=1) / c.sum(axis=1)
        return point, reps
    raise ValueError(f"unknown metric {metric!r}")


def interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of the finite replicates (NaN, NaN when there are none)."""
    r = replicates[np.isfinite(replicates)]
    if len(r) == 0:
        return float("nan"), float("nan")
    a = (1 - confidence) / 2
    lo, hi = np.quantile(r, [a, 1 - a])
    return float(lo), float(hi)
