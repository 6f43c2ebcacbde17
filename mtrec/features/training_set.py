"""Point-in-time feature tables for training, evaluation and scoring, all through FeatureService mtrec_ranker_v1.

A row for an impression on day d sees features as of 00:00 UTC of d (the serving cut-off: daily aggregates up
to d-1, behaviour sequences cut at the start of d); a scoring row for ds sees features as of the end of ds.
User-side features are retrieved once per (user, scenario, cut-off) and item-side once per (item, scenario,
cut-off), then joined onto the rows: the same retrieval path for training and scoring, at a fraction of the cost
of a per-impression join. Item text embeddings stay a matrix keyed by item.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.data.raw import end_of_day
from mtrec.features import store as FS
from mtrec.features.frame import CodedSequences, FeatureTable, ItemEmbeddings, distinct_index
from mtrec.warehouse import Warehouse, as_utc, q

log = logging.getLogger(__name__)

COUNT_PREFIXES = ("us_impressions_", "is_impressions_", "item_impressions_")


def root_tasks(cfg: MtrecConfig) -> list[str]:
    """Tasks that depend on no other: a positive on any of them is 'engagement' for behaviour sequences."""
    return [t.name for t in cfg.tasks if t.depends_on is None]


# Feast's DuckDB offline store runs every retrieval on ibis's default connection, one per process: retrievals
# from several threads (the score stage fetches its first users beside the item side) take turns
RETRIEVAL_LOCK = threading.Lock()


def set_offline_threads(cfg: MtrecConfig, n: int) -> int | None:
    """Set the worker threads of the DuckDB connection Feast's DuckDB offline store retrieves on (ibis's default
    backend, one per process); returns the previous setting, or None when the offline store is not DuckDB."""
    if FS.postgres_settings(cfg) is not None:
        return None
    import ibis

    from mtrec.warehouse.duckdb_backend import set_duckdb_threads

    with RETRIEVAL_LOCK:
        return set_duckdb_threads(ibis.get_backend().con, n)


def _retrieve(store, keys: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """get_historical_features for unique entity rows; `event_timestamp` is the cut-off instant (made UTC here:
    the store does not coerce it, see `FS.feature_store`)."""
    if keys.empty or not features:
        return keys.copy()
    keys = keys.assign(event_timestamp=as_utc(keys["event_timestamp"]))
    with RETRIEVAL_LOCK:
        return store.get_historical_features(entity_df=keys, features=features).to_df()


def _side_features(cfg: MtrecConfig, store, rows: pd.DataFrame, side: str) -> pd.DataFrame:
    key = "user_id" if side == "user" else "item_id"
    keys = rows[[key, "scenario", "feature_time"]].drop_duplicates().rename(
        columns={"feature_time": "event_timestamp"}).reset_index(drop=True)
    keys[key] = keys[key].fillna("")
    got = _retrieve(store, keys, FS.service_features(store, side))
    got["event_timestamp"] = as_utc(got["event_timestamp"])
    return got.rename(columns={"event_timestamp": "feature_time"})


def _positives(wh: Warehouse, cfg: MtrecConfig, keys: pd.DataFrame) -> pd.DataFrame:
    """(user_id, cutoff, item_id, rn): the last N engaged items strictly before each (user_id, cutoff) of `keys`
    (distinct, UTC cut-offs), rn 1 = the most recent, computed in the warehouse with a window function."""
    n = cfg.features.sequence_length
    positive = " OR ".join(f"{q(t)} = 1" for t in root_tasks(cfg))
    scratch = f"mtrec_seq_keys_{secrets.token_hex(4)}"
    lo = (keys["cutoff"].min() - pd.Timedelta(days=cfg.features.sequence_lookback_days)).date()
    hi = keys["cutoff"].max().date()
    wh.create_table(S.TableSpec(scratch, {"user_id": S.TEXT, "cutoff": S.TIMESTAMP}))
    try:
        wh.insert_df(scratch, keys)
        return wh.query_df(
            f"SELECT user_id, cutoff, item_id, rn FROM ("
            f"  SELECT k.user_id, k.cutoff, e.item_id, row_number() OVER ("
            f"    PARTITION BY k.user_id, k.cutoff ORDER BY e.event_timestamp DESC, e.event_id DESC) AS rn"
            f"  FROM {q(scratch)} k JOIN {q(S.EVENTS)} e ON e.user_id = k.user_id"
            f"  WHERE e.ds BETWEEN :lo AND :hi AND e.event_timestamp < k.cutoff"
            f"    AND e.event_timestamp >= k.cutoff - INTERVAL '{int(cfg.features.sequence_lookback_days)} days'"
            f"    AND ({positive})"
            f") s WHERE rn <= :n", {"lo": lo, "hi": hi, "n": n})
    finally:
        wh.execute(f"DROP TABLE IF EXISTS {q(scratch)}")


def sequences_for(wh: Warehouse, cfg: MtrecConfig, keys: pd.DataFrame) -> np.ndarray:
    """Last N engaged items strictly before each (user_id, cutoff), computed in the warehouse with a window function.

    Returns an object array [len(keys), N] of item ids, most recent first, "" padding.
    """
    n = cfg.features.sequence_length
    out = np.full((len(keys), max(n, 0)), "", dtype=object)
    if n == 0 or keys.empty:
        return out
    k = keys[["user_id", "cutoff"]].drop_duplicates().reset_index(drop=True)
    k["cutoff"] = as_utc(k["cutoff"])
    seq = _positives(wh, cfg, k)
    if seq.empty:
        return out
    if len(k) == k["user_id"].nunique():  # one cutoff per user (scoring): map by user alone
        pair_ids, uniques = pd.factorize(seq["user_id"])
        row_pairs = pd.Index(uniques).get_indexer(keys["user_id"])
    else:
        seq["cutoff"] = as_utc(seq["cutoff"])
        index = pd.MultiIndex.from_frame(keys[["user_id", "cutoff"]].assign(cutoff=as_utc(keys["cutoff"])))
        # map each (user, cutoff) of the result to every row of `keys` with that pair
        pair_ids, uniques = pd.MultiIndex.from_frame(seq[["user_id", "cutoff"]]).factorize()
        row_pairs = uniques.get_indexer(index)
    table = np.full((len(uniques) + 1, n), "", dtype=object)  # last row: users without history
    table[pair_ids, seq["rn"].to_numpy().astype(int) - 1] = seq["item_id"].to_numpy()
    return table[np.where(row_pairs >= 0, row_pairs, len(uniques))]


@dataclass
class SequenceCodes:
    """Behaviour sequences of many users at one cut-off, kept compact: item codes [n_users, N] (-1: padding)."""

    users: pd.Index
    codes: np.ndarray  # int32 [n_users, N]
    items: np.ndarray  # object [n_codes + 1]: the item id of each code, then "" (padding)

    def rows(self, user_ids: list[str]) -> CodedSequences:
        """The sequences of `user_ids` in that order (`.decode()`: the object array `sequences_for` returns);
        unknown users: padding."""
        pos = self.users.get_indexer(pd.Index(user_ids))
        return CodedSequences(np.where(pos[:, None] >= 0, self.codes[np.maximum(pos, 0)], -1), self.items)


def sequence_codes(wh: Warehouse, cfg: MtrecConfig, user_ids: list[str] | pd.Index, cutoff: pd.Timestamp,
                   batch: int = 50_000) -> SequenceCodes:
    """`sequences_for` of every user at one cut-off, in batches of users (one warehouse query each), as codes
    (the positives are coded as they arrive: no [users, N] array of item ids is built). `user_ids` may repeat
    users (`distinct_index`)."""
    users = distinct_index(user_ids)
    n = max(cfg.features.sequence_length, 0)
    codes = np.full((len(users), n), -1, np.int32)
    known = pd.Index([], dtype=object)
    cutoff = as_utc(pd.Series([pd.Timestamp(cutoff)])).iloc[0]
    for start in range(0, len(users) if n else 0, batch):
        part = users[start:start + batch]
        seq = _positives(wh, cfg, pd.DataFrame({"user_id": part, "cutoff": cutoff}))
        if seq.empty:
            continue
        items = seq["item_id"].to_numpy()
        new = pd.Index(pd.unique(items))
        known = known.append(new.difference(known)) if len(known) else new
        codes[start + part.get_indexer(seq["user_id"]), seq["rn"].to_numpy().astype(np.int64) - 1] = \
            known.get_indexer(items)
    return SequenceCodes(users=users, codes=codes, items=np.append(known.to_numpy(dtype=object), ""))


def load_item_embeddings(cfg: MtrecConfig, wh: Warehouse | None = None,
                         item_ids: list[str] | None = None) -> ItemEmbeddings | None:
    """The title-embedding matrix keyed by item (the features stage keeps it up to date)."""
    df = FS.load_embeddings(cfg)
    if df is None or df.empty:
        return None
    if item_ids is not None:
        df = df[df["item_id"].isin(set(item_ids))]
    vectors = np.stack(df["title_embedding"].to_numpy()).astype(np.float32) if len(df) else np.zeros((0, 384), np.float32)
    return ItemEmbeddings(item_ids=df["item_id"].tolist(), vectors=vectors,
                          missing=df["title_missing"].to_numpy().astype(bool),
                          encoder_id=cfg.text_encoder.name_or_path)


def _join_side(frame: pd.DataFrame, got: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """frame left-joined with a side's features on `on` (id, scenario, feature_time), at most one match per row.
    When the scenario and the feature time are each one value on both sides (scoring: one scenario as of one
    date), the join is on the id alone: the same rows, without hashing three keys per row."""
    same = [k for k in on[1:] if len(frame) and len(got) and (frame[k] == frame[k].iat[0]).all()
            and (got[k] == frame[k].iat[0]).all()]
    index = pd.Index(got[on[0]])
    if len(same) == len(on) - 1 and index.is_unique:  # one hash table of the ids, checked then looked up
        extra = got.drop(columns=on).set_axis(index, axis=0).reindex(frame[on[0]])
        return pd.concat([frame, extra.reset_index(drop=True)], axis=1)
    return frame.merge(got, on=on, how="left", validate="many_to_one")


def _assemble(cfg: MtrecConfig, wh: Warehouse, rows: pd.DataFrame, *, sides: tuple[str, ...] = ("user", "item"),
              prefetched: dict[str, pd.DataFrame] | None = None, store=None,
              embeddings: ItemEmbeddings | None = None, sequences: bool = True,
              attributes: FS.Attributes | None = None) -> FeatureTable:
    """Join user- and item-side features (as of each row's feature_time), sequences and embeddings onto rows.

    `sides` limits retrieval to one side (scoring builds user rows and item rows separately); `prefetched`
    holds a side's retrieval result already fetched for a superset of the keys (one Feast call per scenario
    instead of one per user chunk). Behaviour sequences are built when the user side is requested, unless
    `sequences` is off (scoring fetches them once per stage with `sequence_codes`). `attributes`: the attribute
    columns when already read (`FS.attributes`)."""
    store = store or FS.feature_store(cfg)
    attrs = (attributes or FS.attributes(cfg, wh)).prefixed()
    rows = rows.reset_index(drop=True)
    rows["user_id"] = rows["user_id"].fillna("")
    frame = rows
    keys = {"user": ["user_id", "scenario", "feature_time"], "item": ["item_id", "scenario", "feature_time"]}
    for side in sides:
        got = (prefetched or {}).get(side)
        if got is None:
            got = _side_features(cfg, store, rows, side)
        frame = _join_side(frame, got, keys[side])
    user_num = attrs["user_numeric"] + [c.split(":")[1] for c in FS.service_features(store, "user")
                                         if c.startswith(FS.USER_ENGAGEMENT + ":")]
    item_num = attrs["item_numeric"] + [c.split(":")[1] for c in FS.service_features(store, "item")
                                         if c.startswith(FS.ITEM_STATS + ":")]
    for c in user_num + item_num:
        if c not in frame.columns:
            continue
        if frame[c].dtype != np.float64:
            frame[c] = pd.to_numeric(frame[c], errors="coerce").astype("float64")
        if c.startswith(COUNT_PREFIXES):
            frame[c] = frame[c].fillna(0.0)  # no snapshot row = no impressions in the window
    for c in attrs["user_categorical"] + attrs["item_categorical"]:
        if c in frame.columns:
            frame[c] = frame[c].astype(object).where(frame[c].notna(), None)
    seq = sequences_for(wh, cfg, frame[["user_id", "feature_time"]].rename(columns={"feature_time": "cutoff"})) \
        if "user" in sides and sequences else None
    return FeatureTable(
        frame=frame, tasks=cfg.task_names,
        user_categorical=attrs["user_categorical"], user_numeric=user_num,
        item_categorical=attrs["item_categorical"], item_numeric=item_num,
        sequences=seq, item_embeddings=embeddings if embeddings is not None else load_item_embeddings(cfg, wh),
        feature_service=FS.FEATURE_SERVICE)


def retrieve_side(cfg: MtrecConfig, ds: dt.date, side: str, ids: list[str], scenario: str | list[str],
                  store=None) -> pd.DataFrame:
    """One Feast retrieval of a side's features as of the end of ds for many ids (scoring prefetch), in one
    scenario or in the scenario given per id."""
    key = "user_id" if side == "user" else "item_id"
    rows = pd.DataFrame({key: ids, "scenario": scenario, "feature_time": pd.Timestamp(end_of_day(ds))})
    return _side_features(cfg, store or FS.feature_store(cfg), rows, side)


def build_training_set(cfg: MtrecConfig, wh: Warehouse, start: dt.date, end: dt.date, *,
                       progress: bool = True) -> FeatureTable:
    """Impressions with start <= ds <= end, their labels, and features as of 00:00 UTC of their day."""
    label_cols = ", ".join(f"CAST({q(t)} AS BIGINT) AS {q(t)}" for t in cfg.task_names)
    rows = wh.query_df(
        f"SELECT event_id, user_id, item_id, scenario, ds, event_timestamp, {label_cols} FROM {q(S.EVENTS)} "
        f"WHERE ds BETWEEN :a AND :b ORDER BY ds, event_timestamp, event_id", {"a": start, "b": end})
    rows["ds"] = pd.to_datetime(rows["ds"]).dt.date
    rows["event_timestamp"] = as_utc(rows["event_timestamp"])
    rows["feature_time"] = pd.to_datetime(rows["ds"]).dt.tz_localize("UTC")
    log.info("training set %s..%s: %d impressions", start, end, len(rows))
    return _assemble(cfg, wh, rows)


def build_scoring_table(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, pairs: pd.DataFrame, *,
                        sides: tuple[str, ...] = ("user", "item"), prefetched: dict[str, pd.DataFrame] | None = None,
                        store=None, embeddings: ItemEmbeddings | None = None, sequences: bool = True,
                        attributes: FS.Attributes | None = None) -> FeatureTable:
    """(user_id, scenario, item_id) candidate pairs with features as of the end of ds (no labels)."""
    rows = pairs[["user_id", "scenario", "item_id"]].copy()
    rows["ds"] = ds
    rows["feature_time"] = pd.Timestamp(end_of_day(ds))
    return _assemble(cfg, wh, rows, sides=sides, prefetched=prefetched, store=store, embeddings=embeddings,
                     sequences=sequences, attributes=attributes)
