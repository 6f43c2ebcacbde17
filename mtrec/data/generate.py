"""Stream synthetic days from the generator into the warehouse raw tables (and the truth side table)."""

from __future__ import annotations

import datetime as dt
import logging

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mtrec import schema as S
from mtrec.config import MtrecConfig
from mtrec.data.raw import load_frames
from mtrec.warehouse import ensure_contract_tables, open_warehouse
from mtrec.warehouse.base import normalize_frame

log = logging.getLogger(__name__)

TRUTH_SPEC = S.TableSpec(S.EVENTS_TRUTH, {"event_id": S.TEXT, "p_click": S.DOUBLE, "p_like": S.DOUBLE,
                                          "ds": S.DATE})


def generate_into_warehouse(cfg: MtrecConfig, *, users: int, items: int, days: int, end_date: dt.date,
                            seed: int = 42, scenarios: list[str] | None = None,
                            events_per_user_day: float = 8.0, progress: bool = True) -> dict[str, int]:
    """Generate `days` days ending at end_date and load them day by day (memory stays one day's chunk).

    Idempotent: loads replace rows with the same keys, so generating the same spec twice gives the same tables.
    """
    from mtrec.data.synthetic import GeneratorSpec, generate

    kwargs = {"users": users, "items": items, "days": days, "end_date": end_date, "seed": seed,
              "events_per_user_day": events_per_user_day}
    if scenarios:
        kwargs["scenarios"] = tuple(scenarios)
    spec = GeneratorSpec(**kwargs)
    counts = {"events": 0, "users": 0, "items": 0}
    wh = open_warehouse(cfg)
    try:
        ensure_contract_tables(wh, cfg)
        wh.create_table(TRUTH_SPEC)
        with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("days"),
                      TimeElapsedColumn(), disable=not progress, transient=True) as bar:
            task = bar.add_task("days", total=days)
            last_ds = None
            for batch in generate(spec):
                frames = {"events": batch.events}
                if len(batch.users):
                    frames["users"] = batch.users
                if len(batch.items):
                    frames["items"] = batch.items
                with wh.transaction():
                    got = load_frames(wh, cfg, frames, {t: f"generated {t} {batch.ds}" for t in frames})
                    truth = batch.truth.assign(ds=batch.ds)
                    wh.replace_where_in(S.EVENTS_TRUTH, normalize_frame(truth, TRUTH_SPEC.columns), ["event_id"])
                for t, n in got.items():
                    counts[t] += n
                if batch.ds != last_ds:
                    bar.advance(task)
                    last_ds = batch.ds
    finally:
        wh.close()
    log.info("generated %s", counts)
    return counts
