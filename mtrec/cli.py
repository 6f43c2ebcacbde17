"""The `mtrec` command line: parse arguments, load config, call mtrec.steps; nothing else."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mtrec.errors import ConfigError, MtrecError

app = typer.Typer(
    name="mtrec", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Batch MLOps pipeline for a multi-scenario, multi-task recommender.\n\n"
         "Stages in order: validate, features, train, evaluate, score (+ publish). `mtrec run` runs them all; "
         "`mtrec quickstart` generates demo data and runs the pipeline for its last day.")
data_app = typer.Typer(no_args_is_help=True, help="Generate synthetic data or load raw tables (events, users, items).")
dq_app = typer.Typer(no_args_is_help=True, help="Review data-quality results and reports.")
models_app = typer.Typer(no_args_is_help=True, help="The model registry: list, show, promote, roll back.")
app.add_typer(data_app, name="data")
app.add_typer(dq_app, name="dq")
app.add_typer(models_app, name="models")

console = Console()
err = Console(stderr=True)
_state: dict[str, Any] = {"config": None, "debug": False}

F = TypeVar("F", bound=Callable[..., Any])

DateOpt = Annotated[str, typer.Option("--date", "-d", help="Logical date ds (YYYY-MM-DD, UTC).")]


def _date(value: str, name: str = "--date") -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (expected YYYY-MM-DD)", param_hint=name) from None


def _cfg():
    from mtrec.config import load_config

    return load_config(_state["config"])


def handle_errors(fn: F) -> F:
    """One line on stderr and exit 1 (2 for config errors) instead of a traceback, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter, KeyboardInterrupt):
            raise
        except MtrecError as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except Exception as e:  # noqa: BLE001 - the user gets one line; --debug shows the traceback
            if _state["debug"]:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            err.print(f"[bold red]error:[/] {type(e).__name__}: {first} (rerun with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main_callback(
    config: Annotated[str | None, typer.Option("--config", "-c", help="Path to mtrec.yaml (default: $MTREC_CONFIG or ./mtrec.yaml).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress at INFO level.")] = False,
) -> None:
    """Global options. MTREC_HOME (default ./.mtrec) and MTREC_WAREHOUSE_URL (default duckdb:///$MTREC_HOME/warehouse.duckdb)
    and any MTREC_<SECTION>__<KEY> override the config."""
    _state["config"], _state["debug"] = config, debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=debug)], force=True)
    logging.getLogger("mtrec").setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("great_expectations", "feast", "urllib3", "httpx", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.INFO)


def _print_result(res: Any) -> None:
    status = getattr(res, "status", "")
    colour = {"success": "green", "skipped": "yellow", "gated": "yellow", "failed": "red"}.get(status, "white")
    console.print(f"[bold]{res.stage}[/] {res.ds}: [{colour}]{status}[/] {res.message}", highlight=False, soft_wrap=True)
    for w in getattr(res, "warnings", [])[:20]:
        console.print(f"  [yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    for k, v in (getattr(res, "artifacts", {}) or {}).items():
        console.print(f"  {k}: {v}", highlight=False, soft_wrap=True)


# -- data ---------------------------------------------------------------------------------------------

@data_app.command("generate")
@handle_errors
def data_generate(
    users: Annotated[int, typer.Option(help="Users at the start (more arrive every day).", min=1)] = 2000,
    items: Annotated[int, typer.Option(help="Items at the start (more arrive every day).", min=1)] = 500,
    days: Annotated[int, typer.Option(help="Number of days of events.", min=1)] = 14,
    end_date: Annotated[str, typer.Option("--end-date", help="Last generated day (YYYY-MM-DD, UTC).")] = "2026-01-31",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same data.")] = 42,
    scenarios: Annotated[str | None, typer.Option(help="Comma-separated scenario names (the last is the small one).")] = None,
    events_per_user_day: Annotated[float, typer.Option(help="Mean impressions per active user-day.", min=0.1)] = 8.0,
) -> None:
    """Generate synthetic users, items and events (with true click/like probabilities) into the warehouse."""
    from mtrec.data.generate import generate_into_warehouse

    cfg = _cfg()
    counts = generate_into_warehouse(cfg, users=users, items=items, days=days, end_date=_date(end_date, "--end-date"),
                                     seed=seed, scenarios=scenarios.split(",") if scenarios else None,
                                     events_per_user_day=events_per_user_day)
    console.print(f"generated {counts['events']} events, {counts['users']} users, {counts['items']} items "
                  f"into {cfg.resolved_warehouse_url}", highlight=False, soft_wrap=True)


@data_app.command("load")
@handle_errors
def data_load(
    events: Annotated[str | None, typer.Option(help="CSV or Parquet file of events.")] = None,
    users: Annotated[str | None, typer.Option(help="CSV or Parquet file of users.")] = None,
    items: Annotated[str | None, typer.Option(help="CSV or Parquet file of items.")] = None,
) -> None:
    """Load raw files into the warehouse after checking them against the data contract (all or nothing)."""
    from mtrec.data.raw import load_files
    from mtrec.warehouse import open_warehouse

    if not (events or users or items):
        raise typer.BadParameter("give at least one of --events, --users, --items")
    cfg = _cfg()
    wh = open_warehouse(cfg)
    try:
        counts = load_files(wh, cfg, {"events": events, "users": users, "items": items})
    finally:
        wh.close()
    for table, n in counts.items():
        console.print(f"loaded {n} rows into {table}")


# -- stages -------------------------------------------------------------------------------------------

RunIdOpt = Annotated[str | None, typer.Option("--run-id", help="Run id to record (default: a new manual__<ds>__<hex> id).")]


@app.command()
@handle_errors
def validate(date: DateOpt, run_id: RunIdOpt = None) -> None:
    """Validate the raw tables for ds; exit 1 on any critical failure (the report path is printed)."""
    ds = _date(date)
    from mtrec.steps import validate as step

    res = step.run(_cfg(), ds, run_id=run_id)
    _print_result(res)


@app.command()
@handle_errors
def features(date: DateOpt, run_id: RunIdOpt = None) -> None:
    """Compute feature tables for ds, embed new item titles, feast apply + materialize."""
    ds = _date(date)
    from mtrec.steps import features as step

    _print_result(step.run(_cfg(), ds, run_id=run_id))


RetrainOpt = Annotated[str, typer.Option("--retrain", help="auto | always | never")]


@app.command()
@handle_errors
def train(date: DateOpt, retrain: RetrainOpt = "always", run_id: RunIdOpt = None) -> None:
    """Train a candidate model on the days before ds's holdout and register it as challenger."""
    ds = _date(date)
    if retrain not in ("auto", "always", "never"):
        raise typer.BadParameter("must be auto, always or never", param_hint="--retrain")
    from mtrec.steps import train as step

    _print_result(step.run(_cfg(), ds, run_id=run_id, retrain=retrain))


@app.command()
@handle_errors
def evaluate(
    date: DateOpt, run_id: RunIdOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Promote the candidate whatever the gate says.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (recorded with a forced promotion).")] = None,
) -> None:
    """Gate the candidate against the champion on the holdout; write evaluation.json; promote when blessed."""
    ds = _date(date)
    if force and not reason:
        raise typer.BadParameter("a forced promotion needs --reason", param_hint="--reason")
    from mtrec.steps import evaluate as step

    _print_result(step.run(_cfg(), ds, run_id=run_id, force=force, reason=reason))


ScenarioOpt = Annotated[list[str] | None, typer.Option("--scenario", "-s", help="Only these scenarios (repeatable).")]
ModelOpt = Annotated[str, typer.Option("--model", help="champion | as-of | a registry version.")]


@app.command()
@handle_errors
def score(date: DateOpt, run_id: RunIdOpt = None, scenario: ScenarioOpt = None, model: ModelOpt = "champion") -> None:
    """Score every active user in every scenario with the model and publish the top-K (includes publish)."""
    ds = _date(date)
    from mtrec.steps import publish as pub
    from mtrec.steps import score as step
    from mtrec.steps.base import new_run_id

    cfg = _cfg()
    run_id = run_id or new_run_id(ds)
    _print_result(step.run(cfg, ds, run_id=run_id, scenarios=scenario, model=model))
    _print_result(pub.run(cfg, ds, run_id=run_id, scenarios=scenario))


@app.command()
@handle_errors
def publish(date: DateOpt, run_id: Annotated[str, typer.Option("--run-id", help="The run whose staged scores to publish.")],
            scenario: ScenarioOpt = None) -> None:
    """Publish the staged scores of a run into daily_recommendations (atomic per (ds, scenario))."""
    ds = _date(date)
    from mtrec.steps import publish as step

    _print_result(step.run(_cfg(), ds, run_id=run_id, scenarios=scenario))


@app.command()
@handle_errors
def run(date: DateOpt, retrain: RetrainOpt = "auto", run_id: RunIdOpt = None, scenario: ScenarioOpt = None) -> None:
    """Run all stages for ds in order: validate, features, train, evaluate, score, publish."""
    ds = _date(date)
    if retrain not in ("auto", "always", "never"):
        raise typer.BadParameter("must be auto, always or never", param_hint="--retrain")
    from mtrec.pipeline import run_pipeline

    cfg = _cfg()
    res = run_pipeline(cfg, ds, retrain=retrain, run_id=run_id, scenarios=scenario)
    for stage in res.stages.values():
        _print_result(stage)
    _print_where(cfg, res)


def _print_where(cfg: Any, res: Any) -> None:
    console.print(f"\n[bold]run {res.run_id}[/]: {res.status}; manifest {res.manifest}", highlight=False, soft_wrap=True)
    rows = res.published_rows
    if rows:
        console.print(f"recommendations: table daily_recommendations in {cfg.resolved_warehouse_url} "
                      f"(ds={res.ds}: " + ", ".join(f"{s} {n} rows" for s, n in rows.items()) + ")",
                      highlight=False, soft_wrap=True)
        url = cfg.resolved_warehouse_url
        if url.startswith("duckdb:"):
            from mtrec.warehouse.duckdb_backend import duckdb_path

            path = duckdb_path(url)
            console.print(f"query them: duckdb -readonly {path} \"SELECT * FROM daily_recommendations "
                          f"WHERE ds = DATE '{res.ds}' ORDER BY scenario, user_id, rank LIMIT 20\"",
                          highlight=False, soft_wrap=True)
            console.print(f"  or: python -c \"import duckdb; print(duckdb.connect('{path}', read_only=True).sql("
                          f"\\\"SELECT scenario, count(*) FROM daily_recommendations WHERE ds = DATE '{res.ds}' GROUP BY 1\\\"))\"",
                          highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def backfill(
    start: Annotated[str, typer.Option("--start", help="First ds (YYYY-MM-DD).")],
    end: Annotated[str, typer.Option("--end", help="Last ds (YYYY-MM-DD), inclusive.")],
    retrain: Annotated[str, typer.Option("--retrain", help="never | auto")] = "never",
    model: ModelOpt = "champion",
    force: Annotated[bool, typer.Option("--force", help="Re-publish dates already published by the same model.")] = False,
) -> None:
    """Score and publish past dates in order (resumable; retrains only when asked)."""
    if retrain not in ("never", "auto"):
        raise typer.BadParameter("must be never or auto", param_hint="--retrain")
    d1, d2 = _date(start, "--start"), _date(end, "--end")
    if d2 < d1:
        raise typer.BadParameter("--end is before --start", param_hint="--end")
    from mtrec.backfill import backfill as do_backfill

    results = do_backfill(_cfg(), d1, d2, retrain=retrain, model=model, force=force)
    for r in results:
        if hasattr(r, "stage"):
            _print_result(r)
        else:
            console.print(str(r), highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def quickstart(
    users: Annotated[int, typer.Option(help="Users at the start.", min=10)] = 2000,
    items: Annotated[int, typer.Option(help="Items at the start.", min=10)] = 500,
    days: Annotated[int, typer.Option(help="Days of history.", min=3)] = 14,
    end_date: Annotated[str, typer.Option("--end-date", help="Last day (YYYY-MM-DD).")] = "2026-01-31",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
) -> None:
    """Generate synthetic data and run the daily pipeline for its last day (what `make demo` runs)."""
    from mtrec.data.generate import generate_into_warehouse
    from mtrec.pipeline import run_pipeline

    cfg = _cfg()
    ds = _date(end_date, "--end-date")
    counts = generate_into_warehouse(cfg, users=users, items=items, days=days, end_date=ds, seed=seed)
    console.print(f"generated {counts['events']} events ({days} days up to {ds}) into {cfg.resolved_warehouse_url}",
                  highlight=False, soft_wrap=True)
    res = run_pipeline(cfg, ds)
    for stage in res.stages.values():
        _print_result(stage)
    _print_where(cfg, res)


# -- data quality -------------------------------------------------------------------------------------

def _table(df: Any, title: str) -> None:
    t = Table(title=title, show_lines=False)
    for c in df.columns:
        t.add_column(str(c), overflow="fold")
    for row in df.itertuples(index=False):
        t.add_row(*["" if v is None else str(v) for v in row])
    console.print(t)


@dq_app.command("list")
@handle_errors
def dq_list(limit: Annotated[int, typer.Option(help="How many days.")] = 90) -> None:
    """Validated days: ds, status, critical and warning counts, report path."""
    from mtrec.reports.dq import list_days
    from mtrec.warehouse import open_warehouse

    cfg = _cfg()
    wh = open_warehouse(cfg)
    try:
        _table(list_days(cfg, wh, limit=limit), "data quality")
    finally:
        wh.close()


@dq_app.command("show")
@handle_errors
def dq_show(date: DateOpt) -> None:
    """Every expectation for ds with observed values and thresholds, failures first."""
    ds = _date(date)
    from mtrec.reports.dq import show_day
    from mtrec.warehouse import open_warehouse

    cfg = _cfg()
    wh = open_warehouse(cfg)
    try:
        _table(show_day(cfg, wh, ds), f"data quality {date}")
    finally:
        wh.close()


# -- models -------------------------------------------------------------------------------------------

def _registry():
    from mtrec.registry import ModelRegistry
    from mtrec.warehouse import ensure_contract_tables, open_warehouse

    cfg = _cfg()
    wh = open_warehouse(cfg)
    ensure_contract_tables(wh, cfg)
    return ModelRegistry(cfg, wh), wh


@models_app.command("list")
@handle_errors
def models_list() -> None:
    """All registered versions with status, training date and promotion reason."""
    reg, wh = _registry()
    try:
        _table(reg.list(), "model registry")
    finally:
        wh.close()


@models_app.command("show")
@handle_errors
def models_show(version: Annotated[str, typer.Argument(help="Registry version.")]) -> None:
    """One version in full (metrics, artifact URI, sha256)."""
    import dataclasses

    reg, wh = _registry()
    try:
        console.print_json(json.dumps(dataclasses.asdict(reg.get(version)), default=str))
    finally:
        wh.close()


@models_app.command("promote")
@handle_errors
def models_promote(
    version: Annotated[str, typer.Argument(help="Registry version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the registry history).")] = "manual promotion",
) -> None:
    """Make a version the champion (forced promotion, recorded with its reason)."""
    reg, wh = _registry()
    try:
        mv = reg.promote(version, actor=f"cli:{os.environ.get('USER', 'unknown')}", reason=reason)
        console.print(f"{mv.version} is now champion")
    finally:
        wh.close()


@models_app.command("rollback")
@handle_errors
def models_rollback(reason: Annotated[str, typer.Option(help="Why.")] = "rollback") -> None:
    """Restore the previous champion."""
    reg, wh = _registry()
    try:
        mv = reg.rollback(actor=f"cli:{os.environ.get('USER', 'unknown')}", reason=reason)
        console.print(f"{mv.version} is champion again")
    finally:
        wh.close()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Exit codes: 0 ok, 1 pipeline failure, 2 usage or config error."""
    code: int | str | None = 0
    try:
        app(args=argv, standalone_mode=True)
    except ConfigError as e:  # raised while loading config outside a command wrapper
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        code = 2
    except SystemExit as e:
        code = e.code
    # Leave without interpreter teardown: DuckDB's bindings print reference-leak noise at shutdown when Feast's
    # ibis connections are still alive. Everything we write is already flushed and renamed into place.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    main()
