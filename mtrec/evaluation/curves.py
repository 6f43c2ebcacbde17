"""Compact ROC and calibration curves for the evaluation report (a few dozen points each)."""

from __future__ import annotations

import numpy as np


def roc_points(probs: np.ndarray, labels: np.ndarray, max_points: int = 60) -> list[list[float]]:
    """[[fpr, tpr], ...] from (0, 0) to (1, 1), thinned to at most max_points thresholds."""
    y = labels.astype(bool)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return []
    order = np.argsort(-probs, kind="mergesort")
    p, yy = probs[order], y[order]
    last_of_tie = np.r_[p[1:] != p[:-1], True]
    tpr = np.cumsum(yy)[last_of_tie] / npos
    fpr = np.cumsum(~yy)[last_of_tie] / nneg
    keep = np.unique(np.linspace(0, len(tpr) - 1, min(max_points, len(tpr))).astype(int))
    pts = [[0.0, 0.0]] + [[round(float(fpr[i]), 4), round(float(tpr[i]), 4)] for i in keep]
    if pts[-1] != [1.0, 1.0]:
        pts.append([1.0, 1.0])
    return pts


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[list[float]]:
    """[[mean predicted, observed rate, rows], ...] over equal-count bins of the predictions."""
    if len(probs) == 0:
        return []
    order = np.argsort(probs, kind="mergesort")
    out = []
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            out.append([round(float(probs[chunk].mean()), 5), round(float(labels[chunk].mean()), 5),
                        int(len(chunk))])
    return out
