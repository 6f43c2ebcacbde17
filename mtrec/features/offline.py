"""Feast's DuckDB offline store, reading only the daily snapshot files a retrieval can match.

The features stage exports one Parquet file per day and table (`<table>/ds=YYYY-MM-DD.parquet`, values stamped
within that day or at its end). Feast's DuckDB store reads a file source's whole glob on every retrieval, then
keeps the rows within each feature view's TTL of the entity timestamps: its cost grows with the days of history
(a year of snapshots: every scoring retrieval reads 365 files to use one). This store is Feast's own, with one
change: for a file source whose files are all `ds=` partitions, a historical retrieval reads only the days that
can hold a row within [earliest entity timestamp - TTL, latest entity timestamp]. Results are unchanged: the
point-in-time join is Feast's, on the same rows it would keep. Everything else (materialization, pulls, writes)
is the DuckDB store's.

Selected in the store's config as `offline_store: {type: mtrec.features.offline.SnapshotDuckDBOfflineStore}`
(Feast's custom offline store convention: the config class is the store's name + `Config`).
"""

from __future__ import annotations

import datetime as dt
import glob
import re
from pathlib import Path
from typing import Literal

import pandas as pd
from feast.infra.offline_stores.duckdb import (
    DuckDBOfflineStore,
    DuckDBOfflineStoreConfig,
    _read_data_source,
    _validate_lance_feature_views,
    _write_data_source,
)
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.ibis import get_historical_features_ibis
from feast.infra.offline_stores.offline_utils import infer_event_timestamp_from_entity_df

from mtrec.features.store import SNAPSHOT_STORE
from mtrec.warehouse import as_utc

PARTITION = re.compile(r"^ds=(\d{4}-\d{2}-\d{2})\.parquet$")
DAY = dt.timedelta(days=1)


class SnapshotDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    type: Literal["mtrec.features.offline.SnapshotDuckDBOfflineStore"] = SNAPSHOT_STORE  # type: ignore[assignment]


def snapshot_files(pattern: str, lo: dt.datetime | None, hi: dt.datetime) -> list[str] | None:
    """The files of a local glob that may hold a row stamped within [lo, hi] (lo None: no lower bound), or None
    when they are not all `ds=YYYY-MM-DD.parquet` partitions (or none is left: the caller reads the glob).
    Partition d holds values stamped within [d 00:00, d + 1 00:00] UTC."""
    if "://" in pattern:
        return None
    files = sorted(glob.glob(pattern))
    days = [PARTITION.match(Path(f).name) for f in files]
    if not files or not all(days):
        return None
    keep = []
    for f, m in zip(files, days, strict=True):
        start = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC)
        if start <= hi and (lo is None or start + DAY >= lo):
            keep.append(f)
    return keep or None


def _entity_window(entity_df) -> tuple[dt.datetime, dt.datetime] | None:
    """(earliest, latest) entity timestamp in UTC of a DataFrame entity table; None for a SQL one or no rows."""
    if not isinstance(entity_df, pd.DataFrame) or entity_df.empty:
        return None
    column = infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes, strict=True)))
    ts = as_utc(entity_df[column])  # (naive = UTC, as Feast)
    if ts.isna().any():
        return None
    return ts.min(), ts.max()


def _longest_ttls(feature_views) -> dict[str, dt.timedelta | None]:
    """Per batch source: the longest TTL of the views reading it (None: a view without one, no lower bound)."""
    out: dict[str, dt.timedelta | None] = {}
    for fv in feature_views:
        if fv.batch_source is None:
            continue
        name, ttl = fv.batch_source.name, fv.ttl or None  # (a zero TTL is Feast's "none")
        if name not in out:
            out[name] = ttl
        elif out[name] is not None:
            out[name] = None if ttl is None else max(out[name], ttl)
    return out


class SnapshotDuckDBOfflineStore(DuckDBOfflineStore):
    @staticmethod
    def get_historical_features(config, feature_views, feature_refs, entity_df, registry, project,
                                full_feature_names: bool = False, filter_by_created_timestamp: bool = False):
        _validate_lance_feature_views(feature_views)
        window = _entity_window(entity_df)
        ttls = _longest_ttls(feature_views)

        def reader(source, repo_path: str):
            if window is not None and isinstance(source, FileSource) and source.path.endswith("*.parquet"):
                ttl = ttls.get(source.name)
                files = snapshot_files(source.path, window[0] - ttl if ttl else None, window[1])
                if files is not None:
                    import ibis

                    return ibis.read_parquet(files)
            return _read_data_source(source, repo_path)

        return get_historical_features_ibis(
            config=config, feature_views=feature_views, feature_refs=feature_refs, entity_df=entity_df,
            registry=registry, project=project, full_feature_names=full_feature_names, data_source_reader=reader,
            data_source_writer=_write_data_source, staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
            filter_by_created_timestamp=filter_by_created_timestamp)
