"""Daily engagement aggregates and as-of-end-of-day feature snapshots, computed in the warehouse with SQL."""

from __future__ import annotations

import datetime as dt
import logging

import pandas as pd

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.data.raw import end_of_day
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)

ITEM_DAILY = "item_daily_stats"
USER_DAILY = "user_daily_stats"
USER_SCENARIO_FEATURES = "user_scenario_features"
ITEM_SCENARIO_FEATURES = "item_scenario_features"
FEATURE_TIMESTAMP = "feature_timestamp"


def daily_spec(cfg: MtrecConfig, table: str, key: str) -> S.TableSpec:
    cols = {"ds": S.DATE, "scenario": S.TEXT, key: S.TEXT, "impressions": S.BIGINT}
    cols.update({f"{t}_count": S.BIGINT for t in cfg.task_names})
    return S.TableSpec(table, cols, ("ds", "scenario", key))


def user_feature_columns(cfg: MtrecConfig) -> list[str]:
    cols = []
    for w in cfg.features.windows_days:
        cols.append(f"us_impressions_{w}d")
        cols += [f"us_{t}_rate_{w}d" for t in cfg.task_names]
    return cols


def item_feature_columns(cfg: MtrecConfig) -> list[str]:
    cols = []
    for w in cfg.features.windows_days:
        cols += [f"is_impressions_{w}d", f"item_impressions_{w}d"]
        cols += [f"is_{t}_rate_{w}d" for t in cfg.task_names]
        cols += [f"item_{t}_rate_{w}d" for t in cfg.task_names]
    cols.append("days_since_first_seen")
    return cols


def snapshot_spec(cfg: MtrecConfig, table: str) -> S.TableSpec:
    if table == USER_SCENARIO_FEATURES:
        cols = {"ds": S.DATE, "user_id": S.TEXT, "scenario": S.TEXT, FEATURE_TIMESTAMP: S.TIMESTAMP}
        cols.update({c: S.DOUBLE for c in user_feature_columns(cfg)})
        return S.TableSpec(table, cols, ("ds", "user_id", "scenario"))
    cols = {"ds": S.DATE, "item_id": S.TEXT, "scenario": S.TEXT, FEATURE_TIMESTAMP: S.TIMESTAMP}
    cols.update({c: S.DOUBLE for c in item_feature_columns(cfg)})
    return S.TableSpec(table, cols, ("ds", "item_id", "scenario"))


def ensure_tables(wh: Warehouse, cfg: MtrecConfig) -> None:
    wh.create_table(daily_spec(cfg, ITEM_DAILY, "item_id"))
    wh.create_table(daily_spec(cfg, USER_DAILY, "user_id"))
    wh.create_table(snapshot_spec(cfg, USER_SCENARIO_FEATURES))
    wh.create_table(snapshot_spec(cfg, ITEM_SCENARIO_FEATURES))


def event_days(wh: Warehouse, through: dt.date) -> list[dt.date]:
    df = wh.query_df(f"SELECT DISTINCT ds FROM {q(S.EVENTS)} WHERE ds <= :d ORDER BY ds", {"d": through})
    return [pd.Timestamp(d).date() for d in df["ds"]]


def computed_days(wh: Warehouse, table: str) -> set[dt.date]:
    df = wh.query_df(f"SELECT DISTINCT ds FROM {q(table)}")
    return {pd.Timestamp(d).date() for d in df["ds"]}


def compute_daily(wh: Warehouse, cfg: MtrecConfig, ds: dt.date) -> dict[str, int]:
    """Replace the ds partition of the per-day impression/label counts by (scenario, item) and (scenario, user)."""
    counts = ", ".join(f"sum(CAST({q(t)} AS BIGINT)) AS {q(t + '_count')}" for t in cfg.task_names)
    out = {}
    for table, key in ((ITEM_DAILY, "item_id"), (USER_DAILY, "user_id")):
        with wh.transaction():
            wh.execute(f"DELETE FROM {q(table)} WHERE ds = :d", {"d": ds})
            wh.execute(
                f"INSERT INTO {q(table)} SELECT ds, scenario, {q(key)}, count(*) AS impressions, {counts} "
                f"FROM {q(S.EVENTS)} WHERE ds = :d AND {q(key)} IS NOT NULL GROUP BY ds, scenario, {q(key)}",
                {"d": ds})
            out[table] = int(wh.scalar(f"SELECT count(*) FROM {q(table)} WHERE ds = :d", {"d": ds}))
    return out


def _rate(num: str, den: str, prior: str, strength: float) -> str:
    """Smoothed rate (num + a * prior) / (den + a): small counts shrink to the prior instead of 0 or 1."""
    return f"(({num}) + {strength} * ({prior})) / (({den}) + {strength})"


def compute_snapshots(wh: Warehouse, cfg: MtrecConfig, ds: dt.date) -> dict[str, int]:
    """Feature values as of the end of ds (timestamp 00:00 UTC of ds + 1), over trailing windows of daily stats."""
    a = cfg.features.popularity_prior
    ts = end_of_day(ds)
    tasks = cfg.task_names
    wmax = max(cfg.features.windows_days)
    params = {"d": ds, "lo": ds - dt.timedelta(days=wmax - 1), "ts": ts}
    out: dict[str, int] = {}

    def window_sums(alias: str, key_cols: str, table: str) -> str:
        parts = []
        for w in cfg.features.windows_days:
            cond = f"ds > CAST(:d AS DATE) - {w}"
            parts.append(f"sum(CASE WHEN {cond} THEN impressions ELSE 0 END) AS imp_{w}")
            parts += [f"sum(CASE WHEN {cond} THEN {q(t + '_count')} ELSE 0 END) AS {t}_{w}" for t in tasks]
        return (f"{alias} AS (SELECT {key_cols}, {', '.join(parts)} FROM {q(table)} "
                f"WHERE ds BETWEEN :lo AND :d GROUP BY {key_cols})")

    # Scenario priors over the longest window: the shrinkage target of every smoothed rate.
    prior_parts = ", ".join(f"CAST(sum({q(t + '_count')}) AS DOUBLE PRECISION) / greatest(sum(impressions), 1) AS p_{t}"
                            for t in tasks)
    prior_cte = f"prior AS (SELECT scenario, {prior_parts} FROM {q(ITEM_DAILY)} WHERE ds BETWEEN :lo AND :d GROUP BY scenario)"
    all_prior = ", ".join(f"CAST(sum({q(t + '_count')}) AS DOUBLE PRECISION) / greatest(sum(impressions), 1) AS p_{t}"
                          for t in tasks)
    all_prior_cte = f"allprior AS (SELECT {all_prior} FROM {q(ITEM_DAILY)} WHERE ds BETWEEN :lo AND :d)"

    # user x scenario engagement
    sel = []
    for w in cfg.features.windows_days:
        sel.append(f"CAST(s.imp_{w} AS DOUBLE PRECISION) AS us_impressions_{w}d")
        sel += [f"{_rate(f's.{t}_{w}', f's.imp_{w}', f'p.p_{t}', a)} AS us_{t}_rate_{w}d" for t in tasks]
    with wh.transaction():
        wh.execute(f"DELETE FROM {q(USER_SCENARIO_FEATURES)} WHERE ds = :d", {"d": ds})
        wh.execute(
            f"INSERT INTO {q(USER_SCENARIO_FEATURES)} WITH {window_sums('s0', 'user_id, scenario', USER_DAILY)}, "
            f"{prior_cte} SELECT CAST(:d AS DATE), s.user_id, s.scenario, CAST(:ts AS TIMESTAMPTZ), {', '.join(sel)} "
            f"FROM s0 s JOIN prior p ON p.scenario = s.scenario", params)
        out[USER_SCENARIO_FEATURES] = int(wh.scalar(
            f"SELECT count(*) FROM {q(USER_SCENARIO_FEATURES)} WHERE ds = :d", {"d": ds}))

    # item x scenario popularity and rates, with the item's overall rates as a backoff signal
    sel = []
    for w in cfg.features.windows_days:
        sel += [f"CAST(s.imp_{w} AS DOUBLE PRECISION) AS is_impressions_{w}d",
                f"CAST(o.imp_{w} AS DOUBLE PRECISION) AS item_impressions_{w}d"]
        sel += [f"{_rate(f's.{t}_{w}', f's.imp_{w}', f'p.p_{t}', a)} AS is_{t}_rate_{w}d" for t in tasks]
        sel += [f"{_rate(f'o.{t}_{w}', f'o.imp_{w}', f'ap.p_{t}', a)} AS item_{t}_rate_{w}d" for t in tasks]
    sel.append("CAST(CAST(:d AS DATE) - f.first_ds AS DOUBLE PRECISION) AS days_since_first_seen")
    with wh.transaction():
        wh.execute(f"DELETE FROM {q(ITEM_SCENARIO_FEATURES)} WHERE ds = :d", {"d": ds})
        wh.execute(
            f"INSERT INTO {q(ITEM_SCENARIO_FEATURES)} WITH {window_sums('s0', 'item_id, scenario', ITEM_DAILY)}, "
            f"{window_sums('o0', 'item_id', ITEM_DAILY)}, {prior_cte}, {all_prior_cte}, "
            f"first_seen AS (SELECT item_id, min(ds) AS first_ds FROM {q(ITEM_DAILY)} WHERE ds <= :d GROUP BY item_id) "
            f"SELECT CAST(:d AS DATE), s.item_id, s.scenario, CAST(:ts AS TIMESTAMPTZ), {', '.join(sel)} "
            f"FROM s0 s JOIN o0 o ON o.item_id = s.item_id JOIN prior p ON p.scenario = s.scenario "
            f"CROSS JOIN allprior ap JOIN first_seen f ON f.item_id = s.item_id", params)
        out[ITEM_SCENARIO_FEATURES] = int(wh.scalar(
            f"SELECT count(*) FROM {q(ITEM_SCENARIO_FEATURES)} WHERE ds = :d", {"d": ds}))
    return out


def scenario_priors(wh: Warehouse, cfg: MtrecConfig, through: dt.date) -> pd.DataFrame:
    """Label rate per scenario over the longest window up to `through` (fallback for unseen items)."""
    wmax = max(cfg.features.windows_days)
    parts = ", ".join(f"CAST(sum({q(t + '_count')}) AS DOUBLE PRECISION) / greatest(sum(impressions), 1) AS {q(t)}"
                      for t in cfg.task_names)
    return wh.query_df(f"SELECT scenario, {parts} FROM {q(ITEM_DAILY)} WHERE ds BETWEEN :lo AND :d GROUP BY scenario",
                       {"lo": through - dt.timedelta(days=wmax - 1), "d": through})
