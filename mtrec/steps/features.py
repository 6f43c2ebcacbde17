"""Features stage: daily aggregates in SQL, title embeddings, Feast apply + materialize for the ds window."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from rich.progress import Progress

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.data.raw import end_of_day, latest_rows
from mtrec.features import aggregates as A
from mtrec.features import store as FS
from mtrec.steps.base import StageResult, new_run_id, stage_warehouse, tracked
from mtrec.warehouse import Warehouse

log = logging.getLogger(__name__)

MATERIALIZE_OVERLAP = dt.timedelta(hours=1)


@dataclass
class FeaturesResult(StageResult):
    days_computed: list[str] = field(default_factory=list)
    items_embedded: int = 0


def _days_to_compute(wh: Warehouse, cfg: MtrecConfig, ds: dt.date) -> tuple[list[dt.date], list[dt.date]]:
    """Daily stats for event days not yet computed; snapshots for every calendar day from the first event day.
    ds itself is always recomputed (late data), and whatever a rerun recomputes comes out identical."""
    days = A.event_days(wh, ds)
    if not days:
        return [], []
    done_daily = A.computed_days(wh, A.ITEM_DAILY)
    daily = [d for d in days if d not in done_daily or d == ds]
    done_snap = A.computed_days(wh, A.ITEM_SCENARIO_FEATURES)
    calendar = [days[0] + dt.timedelta(days=i) for i in range((ds - days[0]).days + 1)]
    first_changed = min(daily) if daily else ds
    snaps = [d for d in calendar if d not in done_snap or d >= first_changed
             or not (FS.data_dir(cfg) / A.ITEM_SCENARIO_FEATURES / f"ds={d.isoformat()}.parquet").exists()]
    return daily, snaps


def _embed(cfg: MtrecConfig, wh: Warehouse, ds: dt.date) -> tuple[int, int]:
    from mtrec.features.text import EmbeddingCache, TextEncoder, embed_items

    items = latest_rows(wh, S.ITEMS, as_of=end_of_day(ds)) if wh.table_exists(S.ITEMS) else None
    if items is None or items.empty:
        return 0, 0
    enc = TextEncoder(cfg.text_encoder.name_or_path, max_length=cfg.text_encoder.max_length,
                      batch_size=cfg.text_encoder.batch_size)
    cache = EmbeddingCache(cfg.home / "cache" / "embeddings", enc)
    ids, vectors, missing = embed_items(items, cache)
    FS.export_embeddings(cfg, ids, vectors, missing, end_of_day(ds))
    if FS.postgres_settings(cfg) is not None:  # the PostgreSQL offline store reads them from the warehouse
        FS.store_embeddings_table(wh, ids, vectors, missing, end_of_day(ds))
    return len(ids), cache.stats["misses"]


def _body(cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Warehouse, materialize: bool = True) -> FeaturesResult:
    A.ensure_tables(wh, cfg)
    daily, snaps = _days_to_compute(wh, cfg, ds)
    rows: dict[str, int] = {}
    with Progress(transient=True) as bar:
        t1 = bar.add_task("daily aggregates", total=len(daily))
        for d in daily:
            rows.update(A.compute_daily(wh, cfg, d))
            bar.advance(t1)
        t2 = bar.add_task("feature snapshots", total=len(snaps))
        for d in snaps:
            rows.update(A.compute_snapshots(wh, cfg, d))
            for table in (A.USER_SCENARIO_FEATURES, A.ITEM_SCENARIO_FEATURES):
                FS.export_snapshot(cfg, wh, table, d)
            bar.advance(t2)
    attrs = FS.attributes(cfg, wh)
    exported = FS.export_attributes(cfg, wh, attrs)
    n_items, embedded = _embed(cfg, wh, ds) if cfg.text_encoder.enabled else (0, 0)
    if FS.postgres_settings(cfg) is not None:
        FS.ensure_embeddings_table(wh)
    store = FS.feature_store(cfg)
    store.apply(FS.definitions(cfg, attrs))
    end = end_of_day(ds)
    start = end - dt.timedelta(days=1) - MATERIALIZE_OVERLAP
    if materialize:
        store.materialize(start_date=start, end_date=end)
    msg = (f"{len(daily)} day(s) of aggregates, {len(snaps)} snapshot(s), {embedded} new title embedding(s) "
           f"of {n_items} items; " + (f"materialized {start:%Y-%m-%d %H:%M}..{end:%Y-%m-%d %H:%M} UTC" if materialize
                                      else "online store left as is (backfill)"))
    return FeaturesResult(
        stage="features", ds=ds, run_id=run_id, message=msg, days_computed=[d.isoformat() for d in daily],
        items_embedded=embedded,
        details={"rows": rows, "exported": exported, "daily_days": len(daily), "snapshot_days": len(snaps),
                 "items": n_items, "embedded": embedded, "feature_service": FS.FEATURE_SERVICE,
                 "online_store": cfg.online_store.type,
                 "attributes": {k: list(v) for k, v in attrs.__dict__.items()}},
        artifacts={"feast_registry": str(FS.feast_dir(cfg) / "registry.db")})


def run(cfg: MtrecConfig, ds: dt.date, *, run_id: str | None = None, wh: Warehouse | None = None,
        materialize: bool = True) -> FeaturesResult:
    """Compute features as of the end of ds (and any earlier day not computed yet); idempotent.

    `materialize=False` (backfills of past days) leaves the online store alone: it serves the latest values,
    and batch scoring reads the offline store as of each date anyway."""
    run_id = run_id or new_run_id(ds)
    with stage_warehouse(cfg, wh) as w:
        return tracked("features", cfg, ds, run_id, w, _body, cfg, ds, run_id, w, materialize)
