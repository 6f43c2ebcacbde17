"""Distribution drift of user and item attributes: the day's active population vs the trailing window."""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.errors import WarehouseError
from mtrec.validation.aggregates import Metric, ds_condition
from mtrec.validation.results import WARNING, CheckResult
from mtrec.validation.suites import is_numeric_type, is_timestamp_type
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)

EPS = 1e-4
NOT_ATTRIBUTES = {"user_id", "item_id", "updated_at", "title", "ds", "created_at"}
DRIFT_CHECK = "attribute_drift"


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two count vectors over the same bins."""
    p = np.asarray(expected, dtype=float)
    r = np.asarray(actual, dtype=float)
    p = np.clip(p / max(p.sum(), 1.0), EPS, None)
    r = np.clip(r / max(r.sum(), 1.0), EPS, None)
    return float(np.sum((r - p) * np.log(r / p)))


def jensen_shannon(expected: np.ndarray, actual: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two count vectors over the same bins."""
    p = np.asarray(expected, dtype=float)
    r = np.asarray(actual, dtype=float)
    p, r = p / max(p.sum(), 1.0), r / max(r.sum(), 1.0)
    m = (p + r) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(r, m)


def attribute_columns(cfg: MtrecConfig, table: str, types: dict[str, str]) -> dict[str, str]:
    """Attributes to watch: the configured ones if given, else every non-key column; -> name: numeric|categorical."""
    f = cfg.features
    cat, num = (f.user_categorical, f.user_numeric) if table == S.USERS else (f.item_categorical, f.item_numeric)
    if cat is not None or num is not None:
        out = {c: "categorical" for c in cat or [] if c in types}
        out.update({c: "numeric" for c in num or [] if c in types})
        return out
    return {c: ("numeric" if is_numeric_type(t) else "categorical") for c, t in types.items()
            if c not in NOT_ATTRIBUTES and not is_timestamp_type(t) and not c.startswith("_")}


def _bins(kind: str, ref: pd.Series, ref_w: pd.Series, cur: pd.Series, cur_w: pd.Series,
          n_bins: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if kind == "numeric":
        rv, cv = pd.to_numeric(ref, errors="coerce"), pd.to_numeric(cur, errors="coerce")
        finite = rv.notna()
        if not finite.any():
            edges = np.array([-np.inf, np.inf])
        else:
            order = np.argsort(rv[finite].to_numpy())
            vals, w = rv[finite].to_numpy()[order], ref_w[finite].to_numpy()[order]
            cum = np.cumsum(w) / w.sum()
            qs = [vals[min(np.searchsorted(cum, k / n_bins), len(vals) - 1)] for k in range(1, n_bins)]
            edges = np.unique(np.concatenate([[-np.inf], qs, [np.inf]]))
        def hist(v: pd.Series, w: pd.Series) -> np.ndarray:
            idx = np.searchsorted(edges[1:-1], v.to_numpy(dtype=float), side="right")
            counts = np.bincount(idx[v.notna().to_numpy()], weights=w.to_numpy()[v.notna().to_numpy()],
                                 minlength=len(edges) - 1).astype(float)
            return np.append(counts, w[v.isna()].sum())  # missing values are a bin of their own
        labels = [f"<= {e:.4g}" for e in edges[1:-1]] + ["higher", "null"]
        return hist(rv, ref_w), hist(cv, cur_w), labels
    rs = ref.astype(object).where(ref.notna(), "<null>").astype(str)
    cs = cur.astype(object).where(cur.notna(), "<null>").astype(str)
    top = pd.Series(ref_w.to_numpy(), index=rs.to_numpy()).groupby(level=0).sum().nlargest(n_bins).index.tolist()
    def counts(s: pd.Series, w: pd.Series) -> np.ndarray:
        key = s.where(s.isin(top), "<other>")
        g = pd.Series(w.to_numpy(), index=key.to_numpy()).groupby(level=0).sum()
        return np.array([g.get(k, 0.0) for k in [*top, "<other>"]], dtype=float)
    return counts(rs, ref_w), counts(cs, cur_w), [*top, "<other>"]


def drift_metrics(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, types: dict[str, dict[str, str]]
                  ) -> tuple[list[Metric], list[CheckResult]]:
    """One metric per attribute of users and items, weighted by the impressions of each entity."""
    from mtrec.data.raw import end_of_day

    v = cfg.validation
    ev = types.get(S.EVENTS, {})
    metrics: list[Metric] = []
    notes: list[CheckResult] = []
    js = v.drift_metric == "js"
    warn_thr, crit_thr = (v.drift_js_warning, v.drift_js_critical) if js else (v.drift_psi_warning, v.drift_psi_critical)
    name = "js" if js else "psi"
    for table in (S.USERS, S.ITEMS):
        key = S.ID_COLUMN[table]
        ttypes = types.get(table) or {}
        attrs = attribute_columns(cfg, table, ttypes)
        if not attrs or key not in ev or "ds" not in ev or key not in ttypes:
            continue
        as_of = "WHERE updated_at < :end" if is_timestamp_type(ttypes.get("updated_at")) else ""
        order = "ORDER BY updated_at DESC" if "updated_at" in ttypes else ""
        cols = ", ".join(f"l.{q(c)}" for c in attrs)
        cond = ds_condition(ev, "BETWEEN :a AND :ds")
        cur = ds_condition(ev, "= :ds")
        sql = (f"WITH a AS (SELECT CASE WHEN {cur} THEN 1 ELSE 0 END AS cur, {q(key)} AS id, count(*) AS n "
               f"FROM {q(S.EVENTS)} WHERE {cond} AND {q(key)} IS NOT NULL GROUP BY 1, 2), "
               f"l AS (SELECT * FROM (SELECT t.*, row_number() OVER (PARTITION BY {q(key)} {order}) AS _rn "
               f"FROM {q(table)} t {as_of}) s WHERE _rn = 1) "
               f"SELECT a.cur, a.n, {cols} FROM a JOIN l ON l.{q(key)} = a.id")
        try:
            df = wh.query_df(sql, {"a": ds - dt.timedelta(days=v.drift_window_days), "ds": ds,
                                   "end": end_of_day(ds)})
        except WarehouseError as e:
            notes.append(CheckResult(table, f"{DRIFT_CHECK}[warning]", "", WARNING, False,
                                     f"could not evaluate: {e}", "", {}))
            continue
        df["n"] = pd.to_numeric(df["n"]).astype(float)
        ref, now = df[df["cur"] == 0], df[df["cur"] == 1]
        for col, kind in attrs.items():
            if ref["n"].sum() < v.drift_min_rows or now["n"].sum() < v.drift_min_rows:
                notes += [CheckResult(table, f"{DRIFT_CHECK}[{band}]", col, sev, True,
                                      f"skipped: fewer than {v.drift_min_rows} impressions today or in the "
                                      f"{v.drift_window_days} days before", "", {})
                          for band, sev in (("warning", WARNING), ("critical", v.drift_severity))]
                continue
            e_counts, a_counts, labels = _bins(kind, ref[col], ref["n"], now[col], now["n"], v.drift_bins)
            value = jensen_shannon(e_counts, a_counts) if js else psi(e_counts, a_counts)
            top = np.argsort(-np.abs(a_counts / max(a_counts.sum(), 1) - e_counts / max(e_counts.sum(), 1)))[:2]
            moved = ", ".join(f"{labels[i]} {e_counts[i] / max(e_counts.sum(), 1):.1%}->"
                              f"{a_counts[i] / max(a_counts.sum(), 1):.1%}" for i in top)
            for band, sev, thr in (("warning", WARNING, warn_thr), ("critical", v.drift_severity, crit_thr)):
                metrics.append(Metric(table, f"{DRIFT_CHECK}[{band}]", col, value, None, thr, sev,
                                      f"{name} {value:.4g} ({kind}; {moved})", f"{name} <= {thr:g}",
                                      {"metric": name, "kind": kind}))
    return metrics, notes
