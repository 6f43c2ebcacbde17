"""Backfill: score and publish past dates in order, features as of each date, resumable, retrain only if asked.

`model`: `champion` (today's champion for every date), `as-of` (the champion in force at each date, replayed
from the registry history) or a registry version. A date already published by the same model for every
scenario is skipped unless `force`. Each date gets the run id `backfill__<ds>`, so a resumed or repeated
backfill replaces its own staging and bookkeeping instead of piling up new runs.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.errors import StageError
from mtrec.steps.base import SKIPPED, StageResult, stage_warehouse
from mtrec.warehouse import Warehouse, q

log = logging.getLogger(__name__)


@dataclass
class BackfillDay(StageResult):
    model_version: str = ""
    rows: dict[str, int] = field(default_factory=dict)


def published(wh: Warehouse, ds: dt.date) -> dict[str, set[str]]:
    """scenario -> model versions present in the published partition of ds."""
    df = wh.query_df(f"SELECT scenario, model_version, count(*) AS n FROM {q(S.DAILY_RECOMMENDATIONS)} "
                     f"WHERE ds = :d GROUP BY scenario, model_version", {"d": ds})
    out: dict[str, set[str]] = {}
    for row in df.itertuples(index=False):
        out.setdefault(str(row.scenario), set()).add(str(row.model_version))
    return out


def backfill(cfg: MtrecConfig, start: dt.date, end: dt.date, *, retrain: str = "never", model: str = "champion",
             force: bool = False, scenarios: list[str] | None = None, progress: bool = True) -> list[BackfillDay]:
    """Walk start..end (inclusive) in order; returns one BackfillDay per date (status success or skipped)."""
    from tqdm.auto import tqdm

    from mtrec.data.raw import known_scenarios
    from mtrec.steps import evaluate, features, publish, score, train
    from mtrec.steps.score import resolve_model

    if end < start:
        raise StageError(f"backfill end {end} is before start {start}")
    if retrain not in ("never", "auto", "always"):
        raise StageError(f"retrain must be never, auto or always (got {retrain!r})")
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    results: list[BackfillDay] = []
    with stage_warehouse(cfg, None) as wh:
        for ds in tqdm(days, desc="backfill", unit="day", disable=not progress):
            run_id = f"backfill__{ds.isoformat()}"
            if retrain != "never":
                features.run(cfg, ds, run_id=run_id, wh=wh, materialize=False)
                trained = train.run(cfg, ds, run_id=run_id, wh=wh, retrain=retrain)
                if trained.version:
                    evaluate.run(cfg, ds, run_id=run_id, wh=wh)
            mv, label = resolve_model(cfg, wh, ds, model)
            todo = list(scenarios) if scenarios else known_scenarios(wh, cfg, ds)
            have = published(wh, ds)
            if not force and todo and all(have.get(s) == {label} for s in todo):
                msg = f"{ds}: already published by {label} for {', '.join(todo)}: skipped (use --force to redo)"
                log.info("backfill %s", msg)
                results.append(BackfillDay(stage="backfill", ds=ds, run_id=run_id, status=SKIPPED, message=msg,
                                           model_version=label))
                continue
            if retrain == "never":
                features.run(cfg, ds, run_id=run_id, wh=wh, materialize=False)
            scored = score.run(cfg, ds, run_id=run_id, wh=wh, scenarios=todo, model=mv.version if mv else model)
            pub = publish.run(cfg, ds, run_id=run_id, wh=wh, scenarios=todo)
            rows = dict(getattr(pub, "rows", {}) or {})
            results.append(BackfillDay(
                stage="backfill", ds=ds, run_id=run_id, model_version=scored.model_version, rows=rows,
                message=f"{ds}: published with {scored.model_version}: "
                        + ", ".join(f"{s} {n} rows" for s, n in rows.items())))
    return results
