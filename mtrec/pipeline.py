"""The embedded runner: every stage in order, in-process, on one warehouse connection."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mtrec.config import MtrecConfig
from mtrec.errors import DataValidationError
from mtrec.steps.base import StageResult, new_run_id, run_dir, stage_warehouse

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    ds: dt.date
    run_id: str
    status: str  # success | gated | failed
    stages: dict[str, StageResult] = field(default_factory=dict)
    manifest: Path | None = None
    message: str = ""

    @property
    def published_rows(self) -> dict[str, int]:
        pub = self.stages.get("publish")
        return dict(getattr(pub, "rows", {}) or {}) if pub else {}


def run_pipeline(cfg: MtrecConfig, ds: dt.date, *, retrain: str | None = None, run_id: str | None = None,
                 scenarios: list[str] | None = None, model: str = "champion") -> PipelineResult:
    """validate -> features -> train -> evaluate -> score -> publish for the logical date ds.

    A critical data-quality failure stops the run before features (nothing downstream is written) and
    re-raises DataValidationError. A rejected candidate is not a failure: scoring goes on with the champion.
    """
    from mtrec.steps import evaluate, features, publish, score, train, validate

    run_id = run_id or new_run_id(ds)
    result = PipelineResult(ds=ds, run_id=run_id, status="success",
                            manifest=run_dir(cfg, ds, run_id) / "manifest.json")
    with stage_warehouse(cfg, None) as wh:
        log.info("run %s for ds=%s", run_id, ds)
        try:
            result.stages["validate"] = validate.run(cfg, ds, run_id=run_id, wh=wh)
        except DataValidationError as e:
            result.status, result.message = "failed", str(e)
            raise
        result.stages["features"] = features.run(cfg, ds, run_id=run_id, wh=wh)
        trained = train.run(cfg, ds, run_id=run_id, wh=wh, retrain=retrain)
        result.stages["train"] = trained
        if getattr(trained, "version", None):
            ev = evaluate.run(cfg, ds, run_id=run_id, wh=wh)
            result.stages["evaluate"] = ev
            if getattr(ev, "decision", "") == "rejected":
                result.status = "gated"
        result.stages["score"] = score.run(cfg, ds, run_id=run_id, wh=wh, scenarios=scenarios, model=model)
        result.stages["publish"] = publish.run(cfg, ds, run_id=run_id, wh=wh, scenarios=scenarios)
    result.message = f"published {sum(result.published_rows.values())} rows for {ds}"
    return result
