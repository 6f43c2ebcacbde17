"""Model registry in the warehouse: one champion, challengers, rejected and archived versions, with history."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.errors import ModelError
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, REJECTED, ARCHIVED = "champion", "challenger", "rejected", "archived"
STATUSES = (CHAMPION, CHALLENGER, REJECTED, ARCHIVED)
VERSION_RE = re.compile(r"^v(\d{4,})-(\d{8})$")


class Artifact(Protocol):
    """What the registry needs from a model artifact (mtrec.training.RankerArtifact)."""

    metadata: dict[str, Any]

    def save(self, directory: str | Path) -> str: ...


@dataclass
class ModelVersion:
    version: str
    status: str
    model_name: str
    created_at: dt.datetime
    trained_through: dt.date
    metrics: dict[str, Any]
    artifact_uri: str
    sha256: str
    promoted_by: str | None = None
    reason: str | None = None
    updated_at: dt.datetime | None = None
    train_window: tuple[dt.date, dt.date] | None = field(default=None)


def _to_date(v: Any) -> dt.date:
    if isinstance(v, dt.datetime):
        return v.date()
    if isinstance(v, dt.date):
        return v
    return pd.Timestamp(v).date()


def _to_ts(v: Any) -> dt.datetime | None:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    ts = pd.Timestamp(v)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.to_pydatetime()


def _none(v: Any) -> Any:
    return None if v is None or (not isinstance(v, str | dict | list) and pd.isna(v)) else v


def _row_to_version(row: pd.Series | dict[str, Any]) -> ModelVersion:
    metrics = json.loads(row["metrics"]) if _none(row["metrics"]) else {}
    window = metrics.get("train_window")
    return ModelVersion(
        version=row["version"], status=row["status"], model_name=_none(row["model_name"]) or "",
        created_at=_to_ts(row["created_at"]), trained_through=_to_date(row["trained_through"]),
        metrics=metrics, artifact_uri=row["artifact_uri"], sha256=row["sha256"],
        promoted_by=_none(row["promoted_by"]), reason=_none(row["reason"]), updated_at=_to_ts(row["updated_at"]),
        train_window=(_to_date(window[0]), _to_date(window[1])) if window else None)


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


class ModelRegistry:
    """Versions live in `model_registry`; every status change is a row in `model_registry_history`.

    The champion changes in one warehouse transaction (old champion archived, new one promoted, history
    written), so readers never see zero or two champions. `champion_as_of(ds)` replays the history: the
    champion in force for ds is the last promotion recorded for a logical date <= ds.
    """

    def __init__(self, cfg: MtrecConfig, wh: Warehouse, *, artifact_cls: type | None = None) -> None:
        self.cfg, self.wh = cfg, wh
        self._artifact_cls = artifact_cls
        for spec in (S.MODEL_REGISTRY_SPEC, S.MODEL_REGISTRY_HISTORY_SPEC):
            wh.create_table(spec)
        if wh.dialect == "postgresql":
            # The database itself refuses a second champion, whatever the client does.
            wh.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS ix_model_registry_one_champion ON "
                       f"{q(S.MODEL_REGISTRY)} ({q('status')}) WHERE {q('status')} = 'champion'")

    # -- storage ----------------------------------------------------------------------------------------
    @property
    def artifact_root(self) -> str:
        return self.cfg.registry.artifact_root or str(self.cfg.models_dir.resolve())

    def _artifact_uri(self, version: str) -> str:
        return self.artifact_root.rstrip("/") + "/" + version

    def _artifact_class(self) -> type:
        if self._artifact_cls is None:
            from mtrec.training import RankerArtifact

            self._artifact_cls = RankerArtifact
        return self._artifact_cls

    def _save_artifact(self, artifact: Artifact, uri: str) -> str:
        if not _is_remote(uri):
            path = Path(uri.removeprefix("file://"))
            if path.exists():
                shutil.rmtree(path)  # a half-written directory from a crashed register
            path.mkdir(parents=True)
            return artifact.save(path)
        import fsspec

        with tempfile.TemporaryDirectory(prefix="mtrec-model-") as tmp:
            sha = artifact.save(Path(tmp))
            fs, root = fsspec.core.url_to_fs(uri)
            fs.makedirs(root, exist_ok=True)
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    fs.put_file(str(f), f"{root}/{f.relative_to(tmp).as_posix()}")
        return sha

    # -- reads ------------------------------------------------------------------------------------------
    def _rows(self, where: str = "TRUE", params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.wh.query_df(f"SELECT * FROM {q(S.MODEL_REGISTRY)} WHERE {where} ORDER BY {q('version')}",
                                params or {})

    def get(self, version: str) -> ModelVersion:
        df = self._rows(f"{q('version')} = :v", {"v": version})
        if df.empty:
            known = self._rows()["version"].tolist()
            hint = f" (known: {', '.join(known[-5:])})" if known else " (the registry is empty)"
            raise ModelError(f"unknown model version {version!r}{hint}", table=S.MODEL_REGISTRY)
        return _row_to_version(df.iloc[0])

    def champion(self) -> ModelVersion | None:
        df = self._rows(f"{q('status')} = :s", {"s": CHAMPION})
        if len(df) > 1:
            raise ModelError(f"{len(df)} champions ({', '.join(df['version'])}): the registry is corrupt",
                             table=S.MODEL_REGISTRY)
        return None if df.empty else _row_to_version(df.iloc[0])

    def history(self) -> pd.DataFrame:
        return self.wh.query_df(f"SELECT * FROM {q(S.MODEL_REGISTRY_HISTORY)} ORDER BY {q('changed_at')}")

    def champion_as_of(self, ds: dt.date) -> ModelVersion | None:
        """The champion in force for scoring ds: the last promotion recorded for a logical date <= ds."""
        df = self.wh.query_df(
            f"SELECT {q('version')} FROM {q(S.MODEL_REGISTRY_HISTORY)} WHERE {q('to_status')} = :s "
            f"AND {q('ds')} <= :d ORDER BY {q('ds')} DESC, {q('changed_at')} DESC LIMIT 1",
            {"s": CHAMPION, "d": ds})
        return None if df.empty else self.get(df.iloc[0]["version"])

    def candidate_for(self, trained_through: dt.date) -> ModelVersion | None:
        """The newest challenger trained through that date (the train stage registers it)."""
        df = self._rows(f"{q('status')} = :s AND {q('trained_through')} = :d",
                        {"s": CHALLENGER, "d": trained_through})
        return None if df.empty else _row_to_version(df.iloc[-1])

    def list(self) -> pd.DataFrame:
        df = self._rows()
        cols = ["version", "status", "model_name", "trained_through", "created_at", "promoted_by", "reason",
                "sha256", "artifact_uri"]
        out = df[cols].copy()
        out["sha256"] = out["sha256"].str.slice(0, 12)
        return out.reset_index(drop=True)

    def load(self, version: str) -> Any:
        """Load a version's artifact, verifying its sha256 (ModelError on mismatch or missing files)."""
        mv = self.get(version)
        cls = self._artifact_class()
        if not _is_remote(mv.artifact_uri):
            path = Path(mv.artifact_uri.removeprefix("file://"))
            if not path.exists():
                raise ModelError(f"artifact of {version} is missing at {path}", table=S.MODEL_REGISTRY)
            return cls.load(path, expected_sha256=mv.sha256)
        import fsspec

        with tempfile.TemporaryDirectory(prefix="mtrec-model-") as tmp:
            fs, root = fsspec.core.url_to_fs(mv.artifact_uri)
            if not fs.exists(root):
                raise ModelError(f"artifact of {version} is missing at {mv.artifact_uri}", table=S.MODEL_REGISTRY)
            fs.get(root.rstrip("/") + "/", tmp + "/", recursive=True)
            return cls.load(Path(tmp), expected_sha256=mv.sha256)

    # -- writes -----------------------------------------------------------------------------------------
    def _next_number(self) -> int:
        nums = [int(m.group(1)) for v in self._rows()["version"] if (m := VERSION_RE.match(v))]
        return max(nums, default=0) + 1

    def _history(self, version: str, from_status: str | None, to_status: str, ds: dt.date | None,
                 actor: str | None, reason: str | None, at: dt.datetime) -> None:
        row = {"version": version, "from_status": from_status, "to_status": to_status, "ds": ds,
               "actor": actor, "reason": reason, "changed_at": at}
        from mtrec.warehouse.base import normalize_frame

        self.wh.insert_df(S.MODEL_REGISTRY_HISTORY,
                          normalize_frame(pd.DataFrame([row]), S.MODEL_REGISTRY_HISTORY_SPEC.columns))

    def _set_status(self, version: str, status: str, at: dt.datetime, *, actor: str | None = None,
                    reason: str | None = None, touch_promotion: bool = False) -> None:
        sets = [f"{q('status')} = :s", f"{q('updated_at')} = :t"]
        params: dict[str, Any] = {"s": status, "t": at, "v": version}
        if touch_promotion:
            sets += [f"{q('promoted_by')} = :a", f"{q('reason')} = :r"]
            params.update(a=actor, r=reason)
        self.wh.execute(f"UPDATE {q(S.MODEL_REGISTRY)} SET {', '.join(sets)} WHERE {q('version')} = :v", params)

    def register(self, artifact: Artifact, *, trained_through: dt.date,
                 train_window: tuple[dt.date, dt.date] | None = None,
                 metrics: dict[str, Any] | None = None) -> ModelVersion:
        """Save the artifact under <artifact_root>/<version>/ and record it as a challenger."""
        from mtrec.warehouse.base import normalize_frame

        now = dt.datetime.now(dt.UTC)  # bookkeeping timestamp only; no data decision depends on it
        metrics = dict(metrics or {})
        if train_window is not None:
            metrics["train_window"] = [train_window[0].isoformat(), train_window[1].isoformat()]
        with self.wh.transaction():
            if self.wh.dialect == "postgresql":
                self.wh.execute(f"LOCK TABLE {q(S.MODEL_REGISTRY)} IN EXCLUSIVE MODE")
            version = f"v{self._next_number():04d}-{trained_through:%Y%m%d}"
            uri = self._artifact_uri(version)
            sha = self._save_artifact(artifact, uri)
            model_name = str(artifact.metadata.get("model_name") or artifact.metadata.get("model") or "")
            row = {"version": version, "status": CHALLENGER, "model_name": model_name, "created_at": now,
                   "trained_through": trained_through, "metrics": json.dumps(metrics, default=str),
                   "artifact_uri": uri, "sha256": sha, "promoted_by": None, "reason": None, "updated_at": now}
            self.wh.insert_df(S.MODEL_REGISTRY, normalize_frame(pd.DataFrame([row]), S.MODEL_REGISTRY_SPEC.columns))
            self._history(version, None, CHALLENGER, trained_through, "train", "registered", now)
        log.info("registered %s (%s, trained through %s) at %s", version, model_name, trained_through, uri)
        return self.get(version)

    def update_metrics(self, version: str, metrics: dict[str, Any]) -> None:
        """Merge evaluation results into a version's metrics JSON."""
        mv = self.get(version)
        merged = {**mv.metrics, **metrics}
        self.wh.execute(f"UPDATE {q(S.MODEL_REGISTRY)} SET {q('metrics')} = :m WHERE {q('version')} = :v",
                        {"m": json.dumps(merged, default=str), "v": version})

    def _effective_ds(self, mv: ModelVersion, ds: dt.date | None) -> dt.date:
        """The logical date a change takes effect from when the caller (a person at the CLI) gives none:
        the latest date the registry has acted on, never earlier than the version's own training data."""
        if ds is not None:
            return ds
        last = self.wh.scalar(f"SELECT max({q('ds')}) FROM {q(S.MODEL_REGISTRY_HISTORY)}")
        last_d = _to_date(last) if last is not None and not pd.isna(last) else mv.trained_through
        return max(last_d, mv.trained_through)

    def promote(self, version: str, *, actor: str, reason: str, ds: dt.date | None = None) -> ModelVersion:
        """Make version the champion; the old champion is archived, in one transaction."""
        now = dt.datetime.now(dt.UTC)
        with self.wh.transaction():
            if self.wh.dialect == "postgresql":
                self.wh.execute(f"LOCK TABLE {q(S.MODEL_REGISTRY)} IN EXCLUSIVE MODE")
            mv = self.get(version)
            current = self.champion()
            if current is not None and current.version == version:
                log.info("%s is already champion", version)
                return mv
            eff = self._effective_ds(mv, ds)
            if current is not None:
                self._set_status(current.version, ARCHIVED, now)
                self._history(current.version, CHAMPION, ARCHIVED, eff, actor, f"replaced by {version}", now)
            self._set_status(version, CHAMPION, now, actor=actor, reason=reason, touch_promotion=True)
            self._history(version, mv.status, CHAMPION, eff, actor, reason, now)
        log.info("%s promoted to champion by %s (%s)%s", version, actor, reason,
                 f"; {current.version} archived" if current else "")
        return self.get(version)

    def reject(self, version: str, *, reason: str, ds: dt.date | None = None, actor: str = "gate") -> None:
        """Mark a challenger rejected (the champion is untouched)."""
        now = dt.datetime.now(dt.UTC)
        with self.wh.transaction():
            mv = self.get(version)
            if mv.status == CHAMPION:
                raise ModelError(f"{version} is the champion: roll back or promote another version instead",
                                 table=S.MODEL_REGISTRY)
            self.wh.execute(f"UPDATE {q(S.MODEL_REGISTRY)} SET {q('status')} = :s, {q('reason')} = :r, "
                            f"{q('updated_at')} = :t WHERE {q('version')} = :v",
                            {"s": REJECTED, "r": reason[:2000], "t": now, "v": version})
            self._history(version, mv.status, REJECTED, self._effective_ds(mv, ds), actor, reason[:2000], now)

    def rollback(self, *, actor: str, reason: str = "rollback", ds: dt.date | None = None) -> ModelVersion:
        """Restore the previous champion; the current one is marked rejected so a second rollback goes further back."""
        now = dt.datetime.now(dt.UTC)
        with self.wh.transaction():
            if self.wh.dialect == "postgresql":
                self.wh.execute(f"LOCK TABLE {q(S.MODEL_REGISTRY)} IN EXCLUSIVE MODE")
            current = self.champion()
            if current is None:
                raise ModelError("there is no champion to roll back", table=S.MODEL_REGISTRY)
            promoted = self.wh.query_df(
                f"SELECT h.{q('version')} AS version, max(h.{q('changed_at')}) AS last_promoted FROM "
                f"{q(S.MODEL_REGISTRY_HISTORY)} h JOIN {q(S.MODEL_REGISTRY)} r ON r.{q('version')} = h.{q('version')} "
                f"WHERE h.{q('to_status')} = :c AND r.{q('status')} = :a GROUP BY h.{q('version')} ORDER BY last_promoted DESC",
                {"c": CHAMPION, "a": ARCHIVED})
            if promoted.empty:
                raise ModelError(f"{current.version} is the only champion there has been: nothing to roll back to",
                                 table=S.MODEL_REGISTRY_HISTORY)
            previous = self.get(promoted.iloc[0]["version"])
            eff = self._effective_ds(current, ds)
            self._set_status(current.version, REJECTED, now)
            self._history(current.version, CHAMPION, REJECTED, eff, actor, reason, now)
            self._set_status(previous.version, CHAMPION, now, actor=actor, reason=reason, touch_promotion=True)
            self._history(previous.version, ARCHIVED, CHAMPION, eff, actor, reason, now)
        log.info("rolled back %s -> %s by %s (%s)", current.version, previous.version, actor, reason)
        return self.get(previous.version)
