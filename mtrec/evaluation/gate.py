"""The gate: a candidate is blessed only with evidence that it is at least as good as the model it replaces.

Both models are scored on the same holdout rows, so every difference is paired; intervals come from a
bootstrap that resamples users (impressions of one user are not independent). Rules, in order:

1. floor      per task, all scenarios pooled: candidate AUC >= floor (`gate.floor_auc[task]` or
              `gate.default_floor_auc`). Catches broken models (shuffled labels, random weights: AUC ~0.5).
2. slices     per scenario x task slice with >= `gate.min_positives` positives and as many negatives:
              reject when AUC drops by more than `gate.regression_margin` AND the drop is significant (the
              upper bound of the paired interval of candidate - reference is below 0); same for log loss
              rising by more than `gate.logloss_margin`. Both conditions, so noise alone never rejects and a
              tiny-but-certain drop within the margin does not either.
3. primary    the task-weighted mean of the primary metric over the pooled slices must improve by at least
              `gate.min_improvement` (point estimate) AND the lower bound of the improvement's interval must be
              above -margin (the candidate is not plausibly worse by more than the margin).

Why promotion needs evidence (rule 3), rather than "bless unless significantly worse": under the lenient
rule, two models that differ only by seed are each "not significantly worse" than the other, so every
retrain replaces the champion and the served model flips with noise. With a required point improvement the
difference is antisymmetric on a stable holdout (A - B = -(B - A)): at most one direction can pass, so
seed twins cannot flip the champion back and forth, and an identical re-trained model is not promoted.
The lower-bound condition keeps a lucky point estimate with a wide interval from replacing a champion
that might be clearly better. On a first run there is no champion: the reference is the popularity
baseline and the same rules apply (the candidate must beat popularity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mtrec.config import GateSpec
from mtrec.evaluation.bootstrap import HIGHER_IS_BETTER, Resamples, interval, metric_replicates

ALL = "__all__"
BLESSED, REJECTED = "blessed", "rejected"
PASS, FAIL, NOT_JUDGED = "pass", "fail", "not judged"
METRICS = ("auc", "logloss", "gauc")


@dataclass
class SliceStats:
    """Metrics of every model on one (scenario, task) slice, with intervals and paired differences."""

    scenario: str
    task: str
    n: int
    positives: int
    judged: bool  # enough positives and negatives for the slice rules
    point: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> metric -> value
    ci: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    diff: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # other model -> metric -> point/lo/hi


@dataclass
class Rule:
    rule: str
    outcome: str  # pass | fail | not judged
    text: str
    scenario: str | None = None
    task: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GateOutcome:
    decision: str
    reasons: list[str]
    reference: str  # "champion" or a baseline name
    rules: list[Rule]
    slices: list[SliceStats]
    primary: dict[str, float]


def _f(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _where(scenario: str, task: str) -> str:
    return f"all scenarios, task {task}" if scenario == ALL else f"scenario {scenario}, task {task}"


def slice_stats(holdout: pd.DataFrame, predictions: dict[str, dict[str, np.ndarray]], tasks: list[str],
                spec: GateSpec, rs: Resamples, candidate: str = "candidate") -> tuple[list[SliceStats], dict]:
    """Per (scenario incl. all pooled, task): point metrics, intervals, and candidate - other paired diffs.

    Also returns the bootstrap replicates of the candidate and each model on the pooled slices, keyed
    (model, task, metric), which the primary rule aggregates over tasks with the same resamples.
    """
    scenarios = [ALL] + sorted(holdout["scenario"].astype(str).unique())
    scen = holdout["scenario"].astype(str).to_numpy()
    out: list[SliceStats] = []
    pooled: dict[tuple[str, str, str], tuple[float, np.ndarray]] = {}
    for task in tasks:
        lab = pd.to_numeric(holdout[task], errors="coerce").to_numpy(np.float64)
        has_label = np.isfinite(lab)
        for s in scenarios:
            rows = np.flatnonzero(has_label & ((scen == s) if s != ALL else True))
            pos = int(lab[rows].sum()) if len(rows) else 0
            st = SliceStats(scenario=s, task=task, n=len(rows), positives=pos,
                            judged=pos >= spec.min_positives and len(rows) - pos >= spec.min_positives)
            if len(rows) == 0 or pos == 0 or pos == len(rows):
                out.append(st)
                continue
            reps: dict[str, dict[str, np.ndarray]] = {}
            for model, preds in predictions.items():
                st.point[model], st.ci[model], reps[model] = {}, {}, {}
                for m in METRICS:
                    point, r = metric_replicates(m, np.asarray(preds[task]), lab, rows, rs)
                    st.point[model][m], st.ci[model][m], reps[model][m] = point, interval(r, spec.confidence), r
                    if s == ALL:
                        pooled[(model, task, m)] = (point, r)
            for other in predictions:
                if other == candidate:
                    continue
                st.diff[other] = {}
                for m in METRICS:
                    d = reps[candidate][m] - reps[other][m]
                    lo, hi = interval(d, spec.confidence)
                    st.diff[other][m] = {"point": st.point[candidate][m] - st.point[other][m], "lo": lo, "hi": hi}
            out.append(st)
    return out, pooled


def judge(holdout: pd.DataFrame, predictions: dict[str, dict[str, np.ndarray]], *, tasks: list[str],
          spec: GateSpec, task_weights: dict[str, float], reference: str, candidate: str = "candidate",
          reference_label: str | None = None) -> GateOutcome:
    """Apply floor, slice and primary rules to the candidate against `reference` (champion or baseline).

    holdout: one row per impression with `scenario`, `user_id` and one 0/1 column per task, aligned with
    every prediction array. predictions: model name -> task -> probabilities.
    """
    label = reference_label or reference
    rs = Resamples.draw(holdout["user_id"], spec.bootstrap_samples, spec.seed)
    slices, pooled = slice_stats(holdout, predictions, tasks, spec, rs, candidate)
    rules: list[Rule] = []
    conf = f"{spec.confidence:.0%}"

    # 1. absolute floor per task (pooled)
    for st in (s for s in slices if s.scenario == ALL):
        floor = spec.floor_auc.get(st.task, spec.default_floor_auc)
        auc = st.point.get(candidate, {}).get("auc", float("nan"))
        inputs = {"auc": auc, "floor": floor, "n": st.n, "positives": st.positives}
        if not math.isfinite(auc):
            rules.append(Rule("floor", NOT_JUDGED, f"{_where(st.scenario, st.task)}: no positives or no negatives "
                              f"in the holdout, floor not checked", st.scenario, st.task, inputs))
        elif auc < floor:
            rules.append(Rule("floor", FAIL, f"{_where(st.scenario, st.task)}: candidate AUC {_f(auc)} below "
                              f"floor {_f(floor)}: rejected", st.scenario, st.task, inputs))
        else:
            rules.append(Rule("floor", PASS, f"{_where(st.scenario, st.task)}: candidate AUC {_f(auc)} >= "
                              f"floor {_f(floor)}", st.scenario, st.task, inputs))

    # 2. no significant regression beyond the margin on any slice with enough positives
    for st in slices:
        if not st.judged or reference not in st.diff:
            rules.append(Rule("slice", NOT_JUDGED, f"{_where(st.scenario, st.task)}: {st.positives} positives of "
                              f"{st.n} (< {spec.min_positives} positives or negatives), not judged",
                              st.scenario, st.task, {"n": st.n, "positives": st.positives}))
            continue
        for m, margin in (("auc", spec.regression_margin), ("logloss", spec.logloss_margin)):
            d = st.diff[reference][m]
            worse = -d["point"] if HIGHER_IS_BETTER[m] else d["point"]
            significant = d["hi"] < 0 if HIGHER_IS_BETTER[m] else d["lo"] > 0
            cand, ref = st.point[candidate][m], st.point[reference][m]
            verb = "drop" if HIGHER_IS_BETTER[m] else "rise"
            name = m.upper() if m == "auc" else "log loss"
            inputs = {"metric": m, "candidate": cand, "reference": ref, "difference": d["point"],
                      "ci": [d["lo"], d["hi"]], "margin": margin, "n": st.n, "positives": st.positives}
            head = (f"{_where(st.scenario, st.task)}: {name} {_f(cand)} vs {label} {_f(ref)}, "
                    f"{verb} {_f(worse)}")
            ci = f"{conf} CI of the difference [{_f(d['lo'])}, {_f(d['hi'])}]"
            if worse > margin and significant:
                rules.append(Rule("slice", FAIL, f"{head} > margin {_f(margin)} ({ci}): rejected",
                                  st.scenario, st.task, inputs))
            elif worse > margin:
                rules.append(Rule("slice", PASS, f"{head} > margin {_f(margin)} but not significant ({ci})",
                                  st.scenario, st.task, inputs))
            else:
                rules.append(Rule("slice", PASS, f"{head} within margin {_f(margin)} ({ci})" if worse > 0 else
                                  f"{_where(st.scenario, st.task)}: {name} {_f(cand)} vs {label} {_f(ref)}, "
                                  f"no regression", st.scenario, st.task, inputs))

    # 3. primary metric: improvement with evidence (weighted over pooled tasks with enough data)
    m = spec.primary_metric
    sign = 1.0 if HIGHER_IS_BETTER[m] else -1.0
    margin = spec.regression_margin if m != "logloss" else spec.logloss_margin
    usable = [st for st in slices if st.scenario == ALL and st.judged and (candidate, st.task, m) in pooled
              and (reference, st.task, m) in pooled]
    primary: dict[str, float] = {}
    if not usable:
        rules.append(Rule("primary", FAIL, f"primary metric {m}: no task has {spec.min_positives} positives and "
                          f"negatives in the holdout, so an improvement over {label} cannot be shown: rejected",
                          inputs={"metric": m, "min_positives": spec.min_positives}))
    else:
        w = np.array([task_weights.get(st.task, 1.0) for st in usable], dtype=np.float64)
        w = w / w.sum() if w.sum() > 0 else np.full(len(usable), 1.0 / len(usable))
        cand_pt = sum(wi * pooled[(candidate, st.task, m)][0] for wi, st in zip(w, usable, strict=True))
        ref_pt = sum(wi * pooled[(reference, st.task, m)][0] for wi, st in zip(w, usable, strict=True))
        imp_reps = sum(wi * sign * (pooled[(candidate, st.task, m)][1] - pooled[(reference, st.task, m)][1])
                       for wi, st in zip(w, usable, strict=True))
        imp = sign * (cand_pt - ref_pt)
        lo, hi = interval(np.asarray(imp_reps), spec.confidence)
        primary = {"metric": m, "candidate": cand_pt, "reference": ref_pt, "improvement": imp, "lo": lo, "hi": hi,
                   "min_improvement": spec.min_improvement, "margin": margin}
        tasks_s = ", ".join(st.task for st in usable)
        head = (f"primary {m} (tasks {tasks_s}, all scenarios): candidate {_f(cand_pt)} vs {label} {_f(ref_pt)}, "
                f"improvement {imp:+.4f} ({conf} CI [{lo:+.4f}, {hi:+.4f}])")
        if imp < spec.min_improvement:
            rules.append(Rule("primary", FAIL, f"{head} < required {spec.min_improvement:.4f}: rejected",
                              inputs=primary))
        elif not lo > -margin:
            rules.append(Rule("primary", FAIL, f"{head}: lower bound below -{margin:.4f}, the candidate may be "
                              f"worse by more than the margin: rejected", inputs=primary))
        else:
            rules.append(Rule("primary", PASS, f"{head} >= required {spec.min_improvement:.4f}, lower bound above "
                              f"-{margin:.4f}: blessed", inputs=primary))

    # The headline first: primary, then floors, then slices (pooled before per-scenario).
    order = {"primary": 0, "floor": 1, "slice": 2}
    failed = sorted((r for r in rules if r.outcome == FAIL),
                    key=lambda r: (order.get(r.rule, 3), r.scenario != ALL))
    if failed:
        return GateOutcome(REJECTED, [r.text for r in failed], reference, rules, slices, primary)
    checked = sum(r.outcome == PASS for r in rules if r.rule == "slice")
    reasons = [r.text for r in rules if r.rule == "primary"]
    reasons.append(f"no significant regression beyond the margins on {checked} slice checks; "
                   f"every task above its AUC floor")
    return GateOutcome(BLESSED, reasons, reference, rules, slices, primary)
