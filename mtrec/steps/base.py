"""What every stage shares: its result type, run ids, manifests and `pipeline_runs` bookkeeping."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.errors import MtrecError
from mtrec.warehouse import Warehouse, ensure_contract_tables, open_warehouse

log = logging.getLogger(__name__)

SUCCESS, SKIPPED, FAILED, GATED = "success", "skipped", "failed", "gated"


@dataclass
class StageResult:
    """Base result of a stage. `status`: success | skipped | failed | gated (candidate rejected, run goes on)."""

    stage: str
    ds: dt.date
    run_id: str
    status: str = SUCCESS
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != FAILED

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d, default=str))


def new_run_id(ds: dt.date) -> str:
    """A run id for a manual run; orchestrators pass their own (Airflow run_id, KFP run name)."""
    return f"manual__{ds.isoformat()}__{secrets.token_hex(4)}"


def run_dir(cfg: MtrecConfig, ds: dt.date, run_id: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in run_id)
    return cfg.runs_dir / ds.isoformat() / safe


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str, sort_keys=False))
    os.replace(tmp, path)


def read_manifest(cfg: MtrecConfig, ds: dt.date, run_id: str) -> dict[str, Any]:
    path = run_dir(cfg, ds, run_id) / "manifest.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"run_id": run_id, "ds": ds.isoformat(), "stages": {}, "warnings": [], "decisions": {}, "artifacts": {}}


def update_manifest(cfg: MtrecConfig, ds: dt.date, run_id: str, result: StageResult,
                    started: float, finished: float) -> Path:
    """Record a stage in runs/<ds>/<run_id>/manifest.json (read-modify-write; stages of a run are sequential
    except scoring fan-out, which writes distinct keys)."""
    m = read_manifest(cfg, ds, run_id)
    m["stages"][result.stage] = {
        "status": result.status, "message": result.message, "seconds": round(finished - started, 3),
        "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
        "finished_at": dt.datetime.fromtimestamp(finished, dt.UTC).isoformat(),
        "details": result.to_json()["details"], "artifacts": result.artifacts,
    }
    m["warnings"] = sorted(set(m.get("warnings", [])) | {f"{result.stage}: {w}" for w in result.warnings})
    m["artifacts"].update({f"{result.stage}.{k}": v for k, v in result.artifacts.items()})
    if "decision" in result.details:
        m["decisions"][result.stage] = result.details["decision"]
    path = run_dir(cfg, ds, run_id) / "manifest.json"
    _atomic_write_json(path, m)
    return path


def record_stage(wh: Warehouse, result: StageResult, started: float, finished: float) -> None:
    row = {
        "run_id": result.run_id, "ds": result.ds, "stage": result.stage, "status": result.status,
        "started_at": dt.datetime.fromtimestamp(started, dt.UTC),
        "finished_at": dt.datetime.fromtimestamp(finished, dt.UTC),
        "message": result.message[:2000], "details": json.dumps(result.to_json()["details"], default=str)[:100_000],
    }
    import pandas as pd
    wh.write_normalized(S.PIPELINE_RUNS_SPEC, pd.DataFrame([row]), {"run_id": result.run_id, "stage": result.stage})


@contextmanager
def stage_warehouse(cfg: MtrecConfig, wh: Warehouse | None) -> Iterator[Warehouse]:
    """Use the caller's warehouse, or open (and close) one; contract tables always exist afterwards."""
    own = wh is None
    wh = wh or open_warehouse(cfg)
    try:
        ensure_contract_tables(wh, cfg)
        yield wh
    finally:
        if own:
            wh.close()


def tracked(stage: str, cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Warehouse, fn, *args: Any,
            **kwargs: Any) -> StageResult:
    """Run a stage body, then record it in pipeline_runs and the manifest, failed or not.

    Under torchrun only rank 0 keeps the books (the other ranks run the same body)."""
    if int(os.environ.get("RANK", "0")) > 0:
        return fn(*args, **kwargs)
    started = time.time()
    try:
        result = fn(*args, **kwargs)
    except MtrecError as e:
        finished = time.time()
        failed = StageResult(stage=stage, ds=ds, run_id=run_id, status=FAILED, message=str(e))
        try:
            record_stage(wh, failed, started, finished)
            update_manifest(cfg, ds, run_id, failed, started, finished)
        except Exception:  # noqa: BLE001 - never mask the stage's own error
            log.exception("could not record the failure of stage %s", stage)
        raise
    finished = time.time()
    record_stage(wh, result, started, finished)
    update_manifest(cfg, ds, run_id, result, started, finished)
    return result
