"""Train stage: decide whether to retrain (policy), build the point-in-time training set, fit, register."""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field

from mtrec.config import MtrecConfig
from mtrec.errors import StageError
from mtrec.steps.base import SKIPPED, SUCCESS, StageResult, new_run_id, stage_warehouse, tracked
from mtrec.warehouse import Warehouse

log = logging.getLogger(__name__)

FULL, INCREMENTAL, NONE = "full", "incremental", "none"


@dataclass
class TrainResult(StageResult):
    version: str | None = None
    mode: str = NONE
    train_window: tuple[str, str] | None = None
    rows: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Windows:
    """Days used by a training run that produces a candidate for `ds`."""

    train_start: dt.date
    train_end: dt.date
    holdout_start: dt.date
    holdout_end: dt.date


def windows(cfg: MtrecConfig, ds: dt.date) -> Windows:
    """The holdout is the last holdout_days up to ds; training uses the train_days before it."""
    holdout_start = ds - dt.timedelta(days=cfg.training.holdout_days - 1)
    train_end = holdout_start - dt.timedelta(days=1)
    return Windows(train_end - dt.timedelta(days=cfg.training.train_days - 1), train_end, holdout_start, ds)


def decide(cfg: MtrecConfig, wh: Warehouse, ds: dt.date, policy: str) -> tuple[str, str]:
    """(mode, reason) for the retrain policy: auto retrains when there is no champion, the champion is
    older than retrain.every_days, or the DQ drift check flagged a shift; otherwise an incremental update."""
    from mtrec.registry import ModelRegistry

    champion = ModelRegistry(cfg, wh).champion()
    if policy == "never":
        return NONE, "retrain=never"
    if policy == "always":
        return FULL, "retrain=always"
    if champion is None:
        return FULL, "no champion yet"
    age = (ds - champion.trained_through).days
    if age >= cfg.retrain.every_days:
        return FULL, f"champion {champion.version} is {age} days old (retrain.every_days={cfg.retrain.every_days})"
    if cfg.validation.drift_triggers_retrain:
        from mtrec.steps.validate import drift_flag

        if drift_flag(cfg, wh, ds):
            return FULL, "data-quality drift check flagged a shift"
    if age <= 0:
        return NONE, f"champion {champion.version} is already trained through {champion.trained_through}"
    if cfg.retrain.incremental:
        return INCREMENTAL, f"champion {champion.version} is {age} days old: incremental update"
    return NONE, f"champion {champion.version} is recent ({age} days)"


def _body(cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Warehouse, policy: str) -> TrainResult:
    from mtrec.features.training_set import build_training_set
    from mtrec.registry import ModelRegistry
    from mtrec.training import train_model

    mode, reason = decide(cfg, wh, ds, policy)
    if mode == NONE:
        log.info("train %s: skipped (%s)", ds, reason)
        return TrainResult(stage="train", ds=ds, run_id=run_id, status=SKIPPED, message=reason,
                           details={"mode": mode, "reason": reason})
    registry = ModelRegistry(cfg, wh)
    w = windows(cfg, ds)
    start, init_from = w.train_start, None
    if mode == INCREMENTAL:
        champion = registry.champion()
        assert champion is not None
        init_from = registry.load(champion.version)
        prev_end = (init_from.metadata.get("train_window") or [None, None])[1]
        if prev_end:
            start = max(w.train_start, dt.date.fromisoformat(prev_end) + dt.timedelta(days=1))
        if start > w.train_end:
            msg = f"no new days since {champion.version}'s training window ({prev_end})"
            return TrainResult(stage="train", ds=ds, run_id=run_id, status=SKIPPED, message=msg,
                               details={"mode": NONE, "reason": msg})
    log.info("train %s: %s on %s..%s (%s)", ds, mode, start, w.train_end, reason)
    table = build_training_set(cfg, wh, start, w.train_end)
    if len(table) == 0:
        raise StageError(f"no impressions to train on between {start} and {w.train_end}", table="events", ds=ds)
    # The last training day is the validation day for early stopping when there is more than one day.
    days = sorted(table.frame["ds"].unique())
    valid = None
    if len(days) > 1:
        is_valid = (table.frame["ds"] == days[-1]).to_numpy()
        valid, table = table.subset(is_valid), table.subset(~is_valid)
    outcome = train_model(cfg, table, valid, init_from=init_from)
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # under torchrun every rank trains the same weights; rank 0 alone registers them
        return TrainResult(stage="train", ds=ds, run_id=run_id, status=SKIPPED, mode=mode,
                           message=f"rank {rank}: trained with DDP; rank 0 registers the candidate")
    artifact = outcome.artifact
    artifact.metadata["train_window"] = [start.isoformat(), w.train_end.isoformat()]
    artifact.metadata["train_mode"] = mode
    version = registry.register(artifact, trained_through=ds, train_window=(start, w.train_end),
                                metrics={"history": outcome.history})
    return TrainResult(
        stage="train", ds=ds, run_id=run_id, status=SUCCESS,
        message=f"{mode} training -> {version.version} ({reason})", version=version.version, mode=mode,
        train_window=(start.isoformat(), w.train_end.isoformat()), rows=len(table) + (len(valid) if valid else 0),
        history=outcome.history,
        details={"mode": mode, "reason": reason, "version": version.version, "rows": len(table),
                 "train_window": [start.isoformat(), w.train_end.isoformat()],
                 "seconds": round(outcome.seconds, 2)},
        artifacts={"model": version.artifact_uri})


def run(cfg: MtrecConfig, ds: dt.date, *, run_id: str | None = None, wh: Warehouse | None = None,
        retrain: str | None = None) -> TrainResult:
    """Train a candidate for ds when the retrain policy (auto|always|never) asks for one."""
    run_id = run_id or new_run_id(ds)
    policy = retrain or cfg.retrain.policy
    if policy not in ("auto", "always", "never"):
        raise StageError(f"retrain must be auto, always or never (got {policy!r})")
    with stage_warehouse(cfg, wh) as w:
        return tracked("train", cfg, ds, run_id, w, _body, cfg, ds, run_id, w, policy)
