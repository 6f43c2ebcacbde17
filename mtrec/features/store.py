"""Feast glue: the feature repo's objects built from the config, the store, and the offline exports they read."""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.features import aggregates as A
from mtrec.warehouse import Warehouse, as_utc, q

log = logging.getLogger(__name__)

FEATURE_SERVICE = "mtrec_ranker_v1"
OWNER = "mtrec"
USER_ATTRS, ITEM_ATTRS = "user_attributes", "item_attributes"
USER_ENGAGEMENT, ITEM_STATS = "user_scenario_engagement", "item_scenario_stats"
ITEM_TEXT = "item_text_embedding"
# a daily snapshot is valid until the next one, a day later (exclusive: at that instant it is stale; one snapshot
# matches an entity timestamp, not two, and the offline stores read one day of snapshots, not two). In seconds:
# Feast's PostgreSQL store counts TTLs in whole seconds
SNAPSHOT_TTL = dt.timedelta(days=1) - dt.timedelta(seconds=1)
ATTRIBUTE_TTL = dt.timedelta(days=3650)
# the embedded default's offline store: Feast's DuckDB store reading only the snapshot days a retrieval can match
SNAPSHOT_STORE = "mtrec.features.offline.SnapshotDuckDBOfflineStore"
EXCLUDED_ATTRS = {"user_id", "item_id", "updated_at", "title", "ds", "_rn"}


@dataclass(frozen=True)
class Attributes:
    """User and item attribute columns the model reads (prefixed u_/i_ in the feature views)."""

    user_categorical: tuple[str, ...]
    user_numeric: tuple[str, ...]
    item_categorical: tuple[str, ...]
    item_numeric: tuple[str, ...]

    def prefixed(self) -> dict[str, list[str]]:
        return {"user_categorical": [f"u_{c}" for c in self.user_categorical],
                "user_numeric": [f"u_{c}" for c in self.user_numeric],
                "item_categorical": [f"i_{c}" for c in self.item_categorical],
                "item_numeric": [f"i_{c}" for c in self.item_numeric]}


def _split(types: dict[str, str], declared_cat: list[str] | None, declared_num: list[str] | None
           ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if declared_cat is not None or declared_num is not None:
        return tuple(declared_cat or ()), tuple(declared_num or ())
    numeric = ("DOUBLE", "BIGINT", "INTEGER", "FLOAT", "REAL", "NUMERIC", "DOUBLE PRECISION", "SMALLINT")
    cat, num = [], []
    for col, typ in types.items():
        if col in EXCLUDED_ATTRS:
            continue
        (num if any(typ.upper().startswith(n) for n in numeric) else cat).append(col)
    return tuple(cat), tuple(num)


def attributes(cfg: MtrecConfig, wh: Warehouse) -> Attributes:
    """Attribute columns from config, or inferred from the raw tables' types (text = categorical)."""
    f = cfg.features
    ut = wh.columns(S.USERS) if wh.table_exists(S.USERS) else {}
    it = wh.columns(S.ITEMS) if wh.table_exists(S.ITEMS) else {}
    uc, un = _split(ut, f.user_categorical, f.user_numeric)
    ic, inum = _split(it, f.item_categorical, f.item_numeric)
    return Attributes(uc, un, ic, inum)


def postgres_settings(cfg: MtrecConfig) -> dict | None:
    """Feast's PostgreSQL offline-store settings when the warehouse is PostgreSQL, else None (DuckDB)."""
    from urllib.parse import parse_qsl, unquote

    url = cfg.resolved_warehouse_url
    u = urlsplit(url)
    if u.scheme.split("+")[0] not in ("postgresql", "postgres"):
        return None
    query = dict(parse_qsl(u.query))
    return {"type": "postgres", "host": u.hostname or "localhost", "port": u.port or 5432,
            "database": (u.path or "/postgres").lstrip("/") or "postgres", "db_schema": query.get("schema", "public"),
            "user": unquote(u.username or "postgres"), "password": unquote(u.password or ""),
            "sslmode": query.get("sslmode", "prefer")}


def _pg_query(pg: dict, table: str, columns: list[tuple[str, str, str | None]]) -> str:
    """SELECT of (column, alias, cast) from a schema-qualified warehouse table, for a PostgreSQLSource."""
    cols = ", ".join(f"CAST({q(c)} AS {cast}) AS {q(a)}" if cast else (q(c) if c == a else f"{q(c)} AS {q(a)}")
                     for c, a, cast in columns)
    return f"SELECT {cols} FROM {q(pg['db_schema'])}.{q(table)}"


EMBEDDINGS_TABLE = "item_text_embeddings"


def ensure_embeddings_table(wh: Warehouse) -> None:
    wh.execute(f"CREATE TABLE IF NOT EXISTS {q(EMBEDDINGS_TABLE)} (item_id TEXT PRIMARY KEY, "
               f"event_timestamp TIMESTAMPTZ NOT NULL, title_embedding REAL[] NOT NULL, title_missing BOOLEAN)")


def store_embeddings_table(wh: Warehouse, item_ids: list[str], vectors: np.ndarray, missing: np.ndarray,
                           ts: dt.datetime) -> None:
    """PostgreSQL offline store: the title embeddings as a real[] table (replaced in one transaction)."""
    with wh.transaction():
        ensure_embeddings_table(wh)
        wh.execute(f"DELETE FROM {q(EMBEDDINGS_TABLE)}")
        if item_ids:
            df = pd.DataFrame({"item_id": item_ids, "event_timestamp": ts,
                               "title_embedding": ["{" + ",".join(f"{x:.7g}" for x in v) + "}" for v in vectors],
                               "title_missing": missing.astype(bool)})
            wh.execute("CREATE TEMP TABLE mtrec_emb_load (item_id TEXT, event_timestamp TIMESTAMPTZ, "
                       "title_embedding TEXT, title_missing BOOLEAN) ON COMMIT DROP")
            wh.insert_df("mtrec_emb_load", df)
            wh.execute(f"INSERT INTO {q(EMBEDDINGS_TABLE)} SELECT item_id, event_timestamp, "
                       f"CAST(title_embedding AS REAL[]), title_missing FROM mtrec_emb_load")


def feast_dir(cfg: MtrecConfig) -> Path:
    return (cfg.home / "feast").resolve()


def data_dir(cfg: MtrecConfig) -> Path:
    return feast_dir(cfg) / "data"


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Atomic parquet write; microsecond timestamps (duckdb 2.0 with Feast wants them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp, coerce_timestamps="us",
                   allow_truncated_timestamps=True)
    os.replace(tmp, path)


def export_attributes(cfg: MtrecConfig, wh: Warehouse, attrs: Attributes) -> dict[str, int]:
    """Every version of each user/item (keyed by updated_at), so joins are point-in-time."""
    out = {}
    for table, key, name, prefix, cat, num in (
            (S.USERS, "user_id", USER_ATTRS, "u_", attrs.user_categorical, attrs.user_numeric),
            (S.ITEMS, "item_id", ITEM_ATTRS, "i_", attrs.item_categorical, attrs.item_numeric)):
        cols = [key, "updated_at", *cat, *num]
        if wh.table_exists(table):
            df = wh.query_df(f"SELECT {', '.join(q(c) for c in cols)} FROM {q(table)} ORDER BY {q(key)}, updated_at")
        else:
            df = pd.DataFrame(columns=cols)
        df["updated_at"] = as_utc(df["updated_at"])
        for c in cat:
            df[c] = df[c].astype(object).where(df[c].notna(), None).map(lambda v: v if v is None else str(v))
        for c in num:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
        df = df.rename(columns={c: prefix + c for c in (*cat, *num)})
        write_parquet(df, data_dir(cfg) / name / "all.parquet")
        out[name] = len(df)
    return out


def export_snapshot(cfg: MtrecConfig, wh: Warehouse, table: str, ds: dt.date) -> int:
    df = wh.query_df(f"SELECT * FROM {q(table)} WHERE ds = :d", {"d": ds}).drop(columns=["ds"])
    df[A.FEATURE_TIMESTAMP] = as_utc(df[A.FEATURE_TIMESTAMP])
    write_parquet(df, data_dir(cfg) / table / f"ds={ds.isoformat()}.parquet")
    return len(df)


def export_embeddings(cfg: MtrecConfig, item_ids: list[str], vectors: np.ndarray, missing: np.ndarray,
                      ts: dt.datetime) -> Path:
    path = data_dir(cfg) / ITEM_TEXT / "all.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    dim = vectors.shape[1]
    table = pa.table({
        "item_id": pa.array(item_ids, pa.string()),
        "event_timestamp": pa.array(pd.DatetimeIndex([ts] * len(item_ids)).as_unit("us"), pa.timestamp("us", tz="UTC")),
        "title_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
        .cast(pa.list_(pa.float32())),
        "title_missing": pa.array(missing.astype(bool)),
    })
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def load_embeddings(cfg: MtrecConfig) -> pd.DataFrame | None:
    path = data_dir(cfg) / ITEM_TEXT / "all.parquet"
    return pq.read_table(path).to_pandas() if path.exists() else None


# -- Feast objects ------------------------------------------------------------------------------------

def definitions(cfg: MtrecConfig, attrs: Attributes) -> list:
    """Entities, sources, feature views and the versioned FeatureService, as in feature_repo/."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.data_format import ParquetFormat
    from feast.types import Array, Bool, Float32, Float64, String

    d = data_dir(cfg)
    pg = postgres_settings(cfg)
    tags = {"team": "mtrec"}
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
                  description="A user (anonymous and unseen users get no rows)", owner=OWNER, tags=tags)
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
                  description="A recommendable item", owner=OWNER, tags=tags)
    scenario = Entity(name="scenario", join_keys=["scenario"], value_type=ValueType.STRING,
                      description="Where the recommendation is shown", owner=OWNER, tags=tags)

    p = attrs.prefixed()
    pg_columns = {
        USER_ATTRS: (S.USERS, [("user_id", "user_id", None), ("updated_at", "updated_at", None)]
                     + [(c, f"u_{c}", "TEXT") for c in attrs.user_categorical]
                     + [(c, f"u_{c}", "DOUBLE PRECISION") for c in attrs.user_numeric]),
        ITEM_ATTRS: (S.ITEMS, [("item_id", "item_id", None), ("updated_at", "updated_at", None)]
                     + [(c, f"i_{c}", "TEXT") for c in attrs.item_categorical]
                     + [(c, f"i_{c}", "DOUBLE PRECISION") for c in attrs.item_numeric]),
        A.USER_SCENARIO_FEATURES: (A.USER_SCENARIO_FEATURES, [(c, c, None) for c in (
            "user_id", "scenario", A.FEATURE_TIMESTAMP, *A.user_feature_columns(cfg))]),
        A.ITEM_SCENARIO_FEATURES: (A.ITEM_SCENARIO_FEATURES, [(c, c, None) for c in (
            "item_id", "scenario", A.FEATURE_TIMESTAMP, *A.item_feature_columns(cfg))]),
        ITEM_TEXT: (EMBEDDINGS_TABLE, [(c, c, None) for c in (
            "item_id", "event_timestamp", "title_embedding", "title_missing")]),
    }

    def source(name: str, ts: str):
        """The warehouse itself: PostgreSQL tables when it is PostgreSQL, else its Parquet exports (DuckDB)."""
        if pg is not None:
            from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import (
                PostgreSQLSource,
            )

            table, cols = pg_columns[name]
            return PostgreSQLSource(name=f"{name}_source", query=_pg_query(pg, table, cols), timestamp_field=ts,
                                    description=f"warehouse table {table}", owner=OWNER, tags=tags)
        return FileSource(name=f"{name}_source", path=str(d / name / "*.parquet"), file_format=ParquetFormat(),
                          timestamp_field=ts, description=f"warehouse export of {name}", owner=OWNER, tags=tags)

    user_attrs = FeatureView(
        name=USER_ATTRS, entities=[user], ttl=ATTRIBUTE_TTL, source=source(USER_ATTRS, "updated_at"),
        schema=[Field(name=c, dtype=String) for c in p["user_categorical"]]
        + [Field(name=c, dtype=Float64) for c in p["user_numeric"]],
        description="User attributes, point-in-time by updated_at", owner=OWNER, tags=tags)
    item_attrs = FeatureView(
        name=ITEM_ATTRS, entities=[item], ttl=ATTRIBUTE_TTL, source=source(ITEM_ATTRS, "updated_at"),
        schema=[Field(name=c, dtype=String) for c in p["item_categorical"]]
        + [Field(name=c, dtype=Float64) for c in p["item_numeric"]],
        description="Item attributes, point-in-time by updated_at", owner=OWNER, tags=tags)
    engagement = FeatureView(
        name=USER_ENGAGEMENT, entities=[user, scenario], ttl=SNAPSHOT_TTL,
        source=source(A.USER_SCENARIO_FEATURES, A.FEATURE_TIMESTAMP),
        schema=[Field(name=c, dtype=Float64) for c in A.user_feature_columns(cfg)],
        description="User x scenario impressions and smoothed label rates over trailing windows, as of the end of "
                    "each day", owner=OWNER, tags=tags)
    stats = FeatureView(
        name=ITEM_STATS, entities=[item, scenario], ttl=SNAPSHOT_TTL,
        source=source(A.ITEM_SCENARIO_FEATURES, A.FEATURE_TIMESTAMP),
        schema=[Field(name=c, dtype=Float64) for c in A.item_feature_columns(cfg)],
        description="Item popularity and smoothed label rates per scenario and overall, days since first seen",
        owner=OWNER, tags=tags)
    text = FeatureView(
        name=ITEM_TEXT, entities=[item], ttl=ATTRIBUTE_TTL, source=source(ITEM_TEXT, "event_timestamp"),
        schema=[Field(name="title_embedding", dtype=Array(Float32)), Field(name="title_missing", dtype=Bool)],
        description=f"Title embedding ({cfg.text_encoder.name_or_path}); the model reads it as a matrix keyed by item",
        owner=OWNER, tags=tags)
    service = FeatureService(
        name=FEATURE_SERVICE, features=[user_attrs, engagement, item_attrs, stats, text],
        description="Everything the ranker reads; training and scoring both retrieve through it", owner=OWNER,
        tags={**tags, "version": "1"})
    return [user, item, scenario, user_attrs, item_attrs, engagement, stats, text, service]


def _online_store(cfg: MtrecConfig) -> dict:
    if cfg.online_store.type == "redis":
        u = urlsplit(cfg.online_store.redis_url)
        db = (u.path or "/0").lstrip("/") or "0"
        conn = f"{u.hostname or 'localhost'}:{u.port or 6379},db={db}"
        if u.password:
            conn += f",password={u.password}"
        return {"type": "redis", "connection_string": conn}
    return {"type": "sqlite", "path": str(feast_dir(cfg) / "online.db")}


def feature_store(cfg: MtrecConfig, *, offline_store: dict | None = None):
    """A FeatureStore configured from mtrec's config (same settings feature_repo/feature_store.yaml reads, but
    for `coerce_tz_aware`: mtrec hands Feast entity timestamps already in UTC (`training_set._retrieve`), and
    Feast's coercion, `pd.to_datetime(utc=True)` on each of them, first boxes up to 10,000 of them into Python
    objects on every retrieval).
    `offline_store`: other offline store settings (e.g. `{"type": "duckdb"}`, Feast's own, to compare with)."""
    from feast import FeatureStore, RepoConfig

    root = feast_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(
        project=cfg.features.feast_project, provider="local", registry=str(root / "registry.db"),
        online_store=_online_store(cfg),
        offline_store=offline_store or postgres_settings(cfg) or {"type": SNAPSHOT_STORE},
        entity_key_serialization_version=3, coerce_tz_aware=False,
        repo_path=str(root))
    return FeatureStore(config=config)


# modules the offline store loads on its first retrieval (the DuckDB backend of ibis and its SQL dialects;
# Feast's data-source plugins, one of which instruments its functions with typeguard when imported): about
# 0.5 s, paid once per process
OFFLINE_STORE_MODULES = ("mtrec.features.offline", "ibis.backends.duckdb", "ibis.backends.sql.compilers", "ibis.formats.pandas",
                         "ibis.formats.pyarrow", "feast.infra.registry.file", "feast.infra.data_sources.mlflow")


def preload_offline_store() -> None:
    """Import what the first offline retrieval would (in a thread that has nothing else to do yet)."""
    import importlib

    for name in OFFLINE_STORE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # another Feast or ibis version: the first retrieval imports what it needs
            log.debug("offline store module %s not preloaded", name)


def open_for_retrieval(cfg: MtrecConfig):
    """`feature_store(cfg)` with the offline store's modules loaded."""
    preload_offline_store()
    return feature_store(cfg)


def service_features(store, side: str) -> list[str]:
    """Feature references of the service for one side: 'user' (user, user x scenario) or 'item'.

    Kept on the store for as long as its registry is unchanged (Feast rebuilds the service from the registry's
    protobuf on every call: about 25 ms, paid on every retrieval and feature-table assembly otherwise)."""
    try:
        proto = store.registry._get_registry_proto(project=store.project, allow_cache=True)
    except AttributeError:  # another registry implementation: no memo
        return _service_features(store, side)
    stamp = (proto.last_updated.seconds, proto.last_updated.nanos)
    memo = getattr(store, "_mtrec_service_refs", None)  # (registry proto, its last update, {side: refs})
    # the same registry: the same proto, or one reloaded with the same last update (Feast's retrievals reload
    # the cached proto)
    if memo is None or memo[1] != stamp or (memo[0] is not proto and stamp == (0, 0)):
        memo = store._mtrec_service_refs = (proto, stamp, {})
    if side not in memo[2]:
        memo[2][side] = _service_features(store, side)
    return list(memo[2][side])


def _service_features(store, side: str) -> list[str]:
    views = {"user": (USER_ATTRS, USER_ENGAGEMENT), "item": (ITEM_ATTRS, ITEM_STATS)}[side]
    svc = store.get_feature_service(FEATURE_SERVICE, allow_cache=True)  # (the store's registry, read once)
    refs = []
    for proj in svc.feature_view_projections:
        if proj.name in views:
            refs += [f"{proj.name}:{f.name}" for f in proj.features]
    return refs
