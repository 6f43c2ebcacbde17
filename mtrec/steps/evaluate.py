"""Evaluate stage: score candidate, champion and baselines on the same holdout, gate, promote or reject."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtrec.config import MtrecConfig
from mtrec.errors import StageError
from mtrec.evaluation.curves import calibration_bins, roc_points
from mtrec.evaluation.gate import ALL, BLESSED, GateOutcome, judge
from mtrec.steps.base import (
    GATED,
    SKIPPED,
    SUCCESS,
    StageResult,
    new_run_id,
    run_dir,
    stage_warehouse,
    tracked,
)
from mtrec.warehouse import Warehouse

log = logging.getLogger(__name__)

SKIPPED_DECISION = "skipped"
EVALUATION_FILE, REPORT_FILE = "evaluation.json", "evaluation.html"


@dataclass
class EvaluateResult(StageResult):
    decision: str = SKIPPED_DECISION  # blessed | rejected | skipped
    reasons: list[str] = field(default_factory=list)
    candidate: str | None = None
    champion: str | None = None
    evaluation_path: str | None = None
    report_path: str | None = None


def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, dt.date):
        return x.isoformat()
    return x


def _with_intervals(metrics: dict, outcome: GateOutcome, model: str) -> dict:
    """Add the bootstrap intervals (`auc_ci`, `logloss_ci`, `gauc_ci`) to a model's metrics tree."""
    out = {s: {t: dict(v) for t, v in tasks.items()} for s, tasks in metrics.items()}
    for st in outcome.slices:
        if model not in st.ci:
            continue
        cell = out.setdefault(st.scenario, {}).setdefault(st.task, {})
        for m, ci in st.ci[model].items():
            cell[f"{m}_ci"] = list(ci)
            cell.setdefault(m, st.point[model][m])
        cell.setdefault("n", st.n)
        cell.setdefault("positives", st.positives)
    return out


def _version_info(mv) -> dict[str, Any] | None:
    if mv is None:
        return None
    return {"version": mv.version, "model_name": mv.model_name, "trained_through": mv.trained_through.isoformat(),
            "train_window": [d.isoformat() for d in mv.train_window] if mv.train_window else None,
            "sha256": mv.sha256, "artifact_uri": mv.artifact_uri}


def build_evaluation(*, ds: dt.date, run_id: str, holdout: pd.DataFrame, tasks: list[str],
                     predictions: dict[str, dict[str, np.ndarray]], metrics: dict[str, dict],
                     outcome: GateOutcome, decision: str, reasons: list[str], forced: bool,
                     forced_reason: str | None, warnings: list[str], candidate: dict | None, champion: dict | None,
                     holdout_days: tuple[dt.date, dt.date], train_window: tuple[dt.date, dt.date, int],
                     training: dict[str, Any], gate_config: dict[str, Any]) -> dict[str, Any]:
    """The content of evaluation.json (a contract other tools read; see DESIGN.md, section 4).

    Top level: decision (blessed | rejected), reasons (list of sentences), holdout {first_day, last_day},
    metrics {candidate, champion (absent on a first run), baselines {name}}, each {scenario: {task: {auc,
    logloss, gauc, ..., auc_ci, logloss_ci, gauc_ci}}} with "__all__" for all scenarios pooled; plus rules
    (every rule with inputs and outcome), differences (paired intervals of candidate - other), curves,
    training history and the gate configuration.
    """
    labels = {t: pd.to_numeric(holdout[t], errors="coerce").to_numpy(np.float64) for t in tasks}
    curves: dict[str, dict[str, Any]] = {}
    for t in tasks:
        ok = np.isfinite(labels[t])
        curves[t] = {name: {"roc": roc_points(np.asarray(p[t], np.float64)[ok], labels[t][ok]),
                            "calibration": calibration_bins(np.asarray(p[t], np.float64)[ok], labels[t][ok])}
                     for name, p in predictions.items()}
    with_ci = {name: _with_intervals(metrics.get(name, {}), outcome, name) for name in predictions}
    differences: dict[str, dict[str, dict[str, Any]]] = {}
    for st in outcome.slices:
        for other, d in st.diff.items():
            differences.setdefault(other, {}).setdefault(st.scenario, {})[st.task] = d
    evaluation = {
        "ds": ds.isoformat(), "run_id": run_id, "decision": decision, "gate_decision": outcome.decision,
        "forced": forced, "forced_reason": forced_reason, "reasons": reasons, "warnings": warnings,
        "reference": outcome.reference, "candidate": candidate, "champion": champion,
        "holdout": {"first_day": holdout_days[0].isoformat(), "last_day": holdout_days[1].isoformat(),
                    "rows": len(holdout), "users": int(holdout["user_id"].nunique()),
                    "scenarios": sorted(holdout["scenario"].astype(str).unique())},
        "train_window": {"first_day": train_window[0].isoformat(), "last_day": train_window[1].isoformat(),
                         "rows": train_window[2]},
        "tasks": tasks, "primary": outcome.primary,
        "metrics": {"candidate": with_ci["candidate"],
                    **({"champion": with_ci["champion"]} if "champion" in with_ci else {}),
                    "baselines": {k: v for k, v in with_ci.items() if k not in ("candidate", "champion")}},
        "differences": differences,
        "rules": [{"rule": r.rule, "outcome": r.outcome, "scenario": r.scenario, "task": r.task, "text": r.text,
                   "inputs": r.inputs} for r in outcome.rules],
        "curves": curves, "training": training, "gate_config": gate_config,
    }
    return _clean(evaluation)


def _body(cfg: MtrecConfig, ds: dt.date, run_id: str, wh: Warehouse, force: bool,
          reason: str | None) -> EvaluateResult:
    from mtrec.features.training_set import build_training_set
    from mtrec.registry import ModelRegistry
    from mtrec.reports.evaluation import write_report
    from mtrec.steps.train import windows
    from mtrec.training import evaluate_predictions, popularity_predictions

    registry = ModelRegistry(cfg, wh)
    candidate = registry.candidate_for(ds)
    champion = registry.champion()
    if candidate is None:
        msg = f"no challenger trained through {ds}: nothing to evaluate"
        log.info("evaluate %s: %s", ds, msg)
        return EvaluateResult(stage="evaluate", ds=ds, run_id=run_id, status=SKIPPED, message=msg,
                              decision=SKIPPED_DECISION, reasons=[msg],
                              champion=champion.version if champion else None,
                              details={"decision": SKIPPED_DECISION, "reasons": [msg]})
    w = windows(cfg, ds)
    holdout = build_training_set(cfg, wh, w.holdout_start, w.holdout_end)
    if len(holdout) == 0:
        raise StageError(f"no impressions in the holdout {w.holdout_start}..{w.holdout_end} to evaluate "
                         f"{candidate.version} on", table="events", ds=ds)
    tasks = [t for t in cfg.task_names if t in holdout.frame.columns]
    if not tasks:
        raise StageError(f"the holdout has none of the task label columns {cfg.task_names}", table="events", ds=ds)
    train_start, train_end = candidate.train_window or (w.train_start, w.train_end)
    log.info("evaluate %s: %s vs %s on %d holdout rows (%s..%s)", ds, candidate.version,
             champion.version if champion else "popularity (first run)", len(holdout), w.holdout_start, w.holdout_end)

    candidate_art = registry.load(candidate.version)
    predictions: dict[str, dict[str, np.ndarray]] = {"candidate": candidate_art.predict(holdout)}
    champion_art = registry.load(champion.version) if champion is not None else None
    if champion_art is not None:
        predictions["champion"] = champion_art.predict(holdout)
    train_table = build_training_set(cfg, wh, train_start, train_end)
    predictions["popularity"] = popularity_predictions(train_table, holdout, cfg)

    warnings: list[str] = []
    if champion is not None and champion.train_window and champion.train_window[1] >= w.holdout_start:
        warnings.append(f"champion {champion.version} was trained on days up to {champion.train_window[1]}, "
                        f"inside the holdout {w.holdout_start}..{w.holdout_end}: its metrics are optimistic")
    reference = "champion" if champion is not None else cfg.gate.baseline
    outcome = judge(holdout.frame, predictions, tasks=tasks, spec=cfg.gate, task_weights={t.name: t.weight for t in cfg.tasks},
                    reference=reference,
                    reference_label=f"champion {champion.version}" if champion is not None else None)
    decision, reasons = outcome.decision, list(outcome.reasons)
    if force and decision != BLESSED:
        reasons = [f"forced promotion: {reason or 'no reason given'} (the gate said {decision})"] + reasons
        decision = BLESSED

    metrics = {name: evaluate_predictions(holdout, preds, tasks) for name, preds in predictions.items()}
    meta = candidate_art.metadata or {}
    evaluation = build_evaluation(
        ds=ds, run_id=run_id, holdout=holdout.frame, tasks=tasks, predictions=predictions, metrics=metrics,
        outcome=outcome, decision=decision, reasons=reasons, forced=bool(force and outcome.decision != BLESSED),
        forced_reason=reason if force else None, warnings=warnings, candidate=_version_info(candidate),
        champion=_version_info(champion), holdout_days=(w.holdout_start, w.holdout_end),
        train_window=(train_start, train_end, len(train_table)),
        training={"history": meta.get("history") or candidate.metrics.get("history") or [],
                  "model_name": meta.get("model_name") or candidate.model_name, "train_mode": meta.get("train_mode")},
        gate_config=cfg.gate.model_dump())

    out_dir = run_dir(cfg, ds, run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_path = out_dir / EVALUATION_FILE
    tmp = eval_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(evaluation, indent=2))
    tmp.replace(eval_path)
    report_path = write_report(evaluation, out_dir / REPORT_FILE)

    summary = {"evaluation": {"ds": ds.isoformat(), "decision": decision, "reference": reference,
                              "holdout": metrics["candidate"].get(ALL, {}), "run_id": run_id}}
    registry.update_metrics(candidate.version, _clean(summary))
    if decision == BLESSED:
        actor = "evaluate --force" if evaluation["forced"] else "gate"
        registry.promote(candidate.version, actor=actor, reason="; ".join(reasons)[:2000], ds=ds)
        status, msg = SUCCESS, f"{candidate.version} blessed and promoted" + (
            f" over {champion.version}" if champion else " (first champion)")
    else:
        registry.reject(candidate.version, reason="; ".join(reasons)[:2000], ds=ds)
        status, msg = GATED, (f"{candidate.version} rejected; champion {champion.version} stays" if champion
                              else f"{candidate.version} rejected; there is no champion yet")
    log.info("evaluate %s: %s", ds, msg)
    for r in reasons:
        log.info("  %s", r)
    return EvaluateResult(
        stage="evaluate", ds=ds, run_id=run_id, status=status, message=msg, warnings=warnings,
        decision=decision, reasons=reasons, candidate=candidate.version,
        champion=(candidate.version if decision == BLESSED else champion.version if champion else None),
        evaluation_path=str(eval_path), report_path=str(report_path),
        details={"decision": decision, "reasons": reasons, "candidate": candidate.version,
                 "previous_champion": champion.version if champion else None, "reference": reference,
                 "forced": evaluation["forced"], "primary": evaluation["primary"]},
        artifacts={"evaluation": str(eval_path), "report": str(report_path)})


def run(cfg: MtrecConfig, ds: dt.date, *, run_id: str | None = None, wh: Warehouse | None = None,
        force: bool = False, reason: str | None = None) -> EvaluateResult:
    """Gate the candidate trained through ds against the champion (or popularity on a first run).

    Blessed: the candidate is promoted. Rejected: the champion stays and the stage is `gated`, not failed.
    `force` promotes whatever the gate says and records `reason`.
    """
    run_id = run_id or new_run_id(ds)
    with stage_warehouse(cfg, wh) as w:
        return tracked("evaluate", cfg, ds, run_id, w, _body, cfg, ds, run_id, w, force, reason)


def read_evaluation(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
