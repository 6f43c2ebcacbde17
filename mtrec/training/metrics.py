"""Offline metrics per scenario x task (AUC, log loss, GAUC, NDCG@K, Recall@K) and the popularity baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mtrec.evaluation.gate import ALL

if TYPE_CHECKING:
    from mtrec.config import MtrecConfig
    from mtrec.features.frame import FeatureTable

EPS = 1e-7


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC with ties counted one half; NaN when a class is absent."""
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, np.float64)).rank(method="average").to_numpy()  # ties: mean rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(probs: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    p = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float:
    """Per-user AUC weighted by the user's impressions, over users with both classes."""
    df = pd.DataFrame({"u": users, "s": scores, "y": np.asarray(labels).astype(np.int8)})
    df["r"] = df.groupby("u")["s"].rank(method="average")
    g = df.groupby("u").agg(n=("y", "size"), pos=("y", "sum"))
    rank_pos = df[df["y"] == 1].groupby("u")["r"].sum()
    g = g.join(rank_pos.rename("rsum")).fillna({"rsum": 0.0})
    g = g[(g["pos"] > 0) & (g["pos"] < g["n"])]
    if g.empty:
        return float("nan")
    neg = g["n"] - g["pos"]
    per_user = (g["rsum"] - g["pos"] * (g["pos"] + 1) / 2) / (g["pos"] * neg)
    return float(np.average(per_user, weights=g["n"]))


def ranking_at_k(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(NDCG@k, Recall@k) averaged over groups (user x scenario on a day) with at least one positive."""
    df = pd.DataFrame({"g": groups, "s": scores, "y": np.asarray(labels).astype(np.float64)})
    pos = df.groupby("g")["y"].transform("sum")
    df = df[pos > 0]
    if df.empty:
        return float("nan"), float("nan")
    df = df.sort_values(["g", "s"], ascending=[True, False], kind="mergesort")
    df["rank"] = df.groupby("g").cumcount() + 1
    top = df[df["rank"] <= k]
    dcg = (top["y"] / np.log2(top["rank"] + 1)).groupby(top["g"]).sum()
    n_pos = df.groupby("g")["y"].sum()
    ideal_n = np.minimum(n_pos, k).astype(int)
    discounts = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))
    idcg = pd.Series(discounts[ideal_n.to_numpy() - 1], index=ideal_n.index)
    ndcg = (dcg.reindex(idcg.index, fill_value=0.0) / idcg).mean()
    recall = (top.groupby("g")["y"].sum().reindex(n_pos.index, fill_value=0.0) / n_pos).mean()
    return float(ndcg), float(recall)


def _slice_metrics(p: np.ndarray, y: np.ndarray, users: np.ndarray, groups: np.ndarray, k: int) -> dict[str, float]:
    ndcg, recall = ranking_at_k(p, y, groups, k)
    return {"auc": auc(p, y), "logloss": logloss(p, y), "gauc": gauc(p, y, users),
            f"ndcg@{k}": ndcg, f"recall@{k}": recall, "n": int(len(y)), "positives": int(y.sum()),
            "label_rate": float(y.mean()) if len(y) else float("nan"),
            "mean_prediction": float(np.mean(p)) if len(p) else float("nan")}


def evaluate_predictions(table: FeatureTable | pd.DataFrame, predictions: dict[str, np.ndarray],
                         tasks: list[str], k: int = 10) -> dict[str, dict[str, dict[str, float]]]:
    """{scenario: {task: metrics}} plus ALL (every scenario pooled). Rows without a label are left out."""
    frame = table.frame if hasattr(table, "frame") else table
    scen = frame["scenario"].astype(str).to_numpy()
    users = frame["user_id"].fillna("").astype(str).to_numpy()
    day = frame["ds"].astype(str).to_numpy() if "ds" in frame.columns else np.zeros(len(frame), dtype=object)
    groups = pd.Series(users).str.cat([pd.Series(scen), pd.Series(day)], sep="\x1f").to_numpy()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in tasks:
        y_all = pd.to_numeric(frame[t], errors="coerce").to_numpy(np.float64)
        p_all = np.asarray(predictions[t], np.float64)
        ok = np.isfinite(y_all)
        for s in [*sorted(set(scen)), ALL]:
            m = ok & ((scen == s) if s != ALL else True)
            out.setdefault(s, {})[t] = _slice_metrics(p_all[m], y_all[m], users[m], groups[m], k)
    return out


def mean_auc(metrics: dict[str, dict[str, dict[str, float]]], min_positives: int = 1) -> float:
    """Mean AUC over scenario x task slices (not the pooled ALL) with enough positives and negatives."""
    vals = [m["auc"] for s, tasks in metrics.items() if s != ALL for m in tasks.values()
            if np.isfinite(m.get("auc", np.nan)) and m.get("positives", 0) >= min_positives]
    return float(np.mean(vals)) if vals else float("nan")


def popularity_predictions(train: FeatureTable, target: FeatureTable, cfg: MtrecConfig) -> dict[str, np.ndarray]:
    """The popularity baseline (no training): each task's smoothed rate per (scenario, item) over the training
    window, shrunk toward the scenario's rate with `features.popularity_prior` pseudo-impressions."""
    prior = cfg.features.popularity_prior
    tf, hf = train.frame, target.frame
    out: dict[str, np.ndarray] = {}
    for t in cfg.task_names:
        y = pd.to_numeric(tf[t], errors="coerce") if t in tf.columns else pd.Series(np.nan, index=tf.index)
        d = pd.DataFrame({"scenario": tf["scenario"].astype(str), "item_id": tf["item_id"], "y": y}).dropna(subset=["y"])
        global_rate = float(d["y"].mean()) if len(d) else 0.0
        scen_rate = d.groupby("scenario")["y"].mean()
        stats = d.groupby(["scenario", "item_id"])["y"].agg(["sum", "count"])
        base = scen_rate.reindex(stats.index.get_level_values(0)).to_numpy()
        smoothed = pd.Series((stats["sum"].to_numpy() + prior * base) / (stats["count"].to_numpy() + prior),
                             index=stats.index)
        keys = pd.MultiIndex.from_arrays([hf["scenario"].astype(str), hf["item_id"]])
        p = smoothed.reindex(keys).to_numpy()
        fallback = scen_rate.reindex(hf["scenario"].astype(str)).fillna(global_rate).to_numpy()
        out[t] = np.where(np.isfinite(p), p, fallback).astype(np.float64)
    return out
