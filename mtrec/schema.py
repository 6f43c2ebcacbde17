"""The data contract as code: table names, required columns, output tables and their types."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtrec.config import MtrecConfig, check_identifier

# Raw inputs (DESIGN section 3).
EVENTS = "events"
USERS = "users"
ITEMS = "items"
EVENTS_TRUTH = "events_truth"  # generator side table: true probabilities per impression
RAW_TABLES = (EVENTS, USERS, ITEMS)

# Outputs and bookkeeping (DESIGN section 4).
DAILY_RECOMMENDATIONS = "daily_recommendations"
DATA_QUALITY_RESULTS = "data_quality_results"
MODEL_REGISTRY = "model_registry"
MODEL_REGISTRY_HISTORY = "model_registry_history"
PIPELINE_RUNS = "pipeline_runs"

# Logical column types; each warehouse backend maps them to its own SQL types.
TEXT, DATE, TIMESTAMP, DOUBLE, BIGINT, BOOLEAN = "text", "date", "timestamp", "double", "bigint", "boolean"
LOGICAL_TYPES = (TEXT, DATE, TIMESTAMP, DOUBLE, BIGINT, BOOLEAN)


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: dict[str, str]  # column -> logical type, in order
    primary_key: tuple[str, ...] = ()
    indexes: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_identifier(self.name, "table")
        for col, typ in self.columns.items():
            check_identifier(col, f"column of {self.name}")
            if typ not in LOGICAL_TYPES:
                raise ValueError(f"{self.name}.{col}: unknown logical type {typ}")


# Required input columns with their logical types. Task label columns come from config.
EVENTS_REQUIRED = {"event_id": TEXT, "user_id": TEXT, "item_id": TEXT, "scenario": TEXT, "event_timestamp": TIMESTAMP}
EVENTS_OPTIONAL = {"position": BIGINT, "dwell_seconds": DOUBLE}
USERS_REQUIRED = {"user_id": TEXT, "updated_at": TIMESTAMP}
ITEMS_REQUIRED = {"item_id": TEXT, "title": TEXT, "updated_at": TIMESTAMP}
KEYS = {EVENTS: ("event_id",), USERS: ("user_id", "updated_at"), ITEMS: ("item_id", "updated_at")}
ID_COLUMN = {USERS: "user_id", ITEMS: "item_id"}


def required_columns(table: str, cfg: MtrecConfig) -> dict[str, str]:
    if table == EVENTS:
        return {**EVENTS_REQUIRED, **{t: BIGINT for t in cfg.task_names}}
    if table == USERS:
        return dict(USERS_REQUIRED)
    if table == ITEMS:
        return dict(ITEMS_REQUIRED)
    raise KeyError(table)


def prob_column(task: str) -> str:
    return f"p_{check_identifier(task, 'task')}"


def recommendations_spec(cfg: MtrecConfig) -> TableSpec:
    cols = {"ds": DATE, "scenario": TEXT, "user_id": TEXT, "rank": BIGINT, "item_id": TEXT, "score": DOUBLE}
    cols.update({prob_column(t): DOUBLE for t in cfg.task_names})
    cols.update({"model_version": TEXT, "run_id": TEXT, "created_at": TIMESTAMP})
    return TableSpec(DAILY_RECOMMENDATIONS, cols, ("ds", "scenario", "user_id", "rank"))


DATA_QUALITY_SPEC = TableSpec(DATA_QUALITY_RESULTS, {
    "ds": DATE, "table_name": TEXT, "expectation": TEXT, "column_name": TEXT, "severity": TEXT,
    "success": BOOLEAN, "observed_value": TEXT, "threshold": TEXT, "details": TEXT, "run_id": TEXT,
    "created_at": TIMESTAMP,
}, ("ds", "table_name", "expectation", "column_name"))

MODEL_REGISTRY_SPEC = TableSpec(MODEL_REGISTRY, {
    "version": TEXT, "status": TEXT, "model_name": TEXT, "created_at": TIMESTAMP, "trained_through": DATE,
    "metrics": TEXT, "artifact_uri": TEXT, "sha256": TEXT, "promoted_by": TEXT, "reason": TEXT,
    "updated_at": TIMESTAMP,
}, ("version",))

MODEL_REGISTRY_HISTORY_SPEC = TableSpec(MODEL_REGISTRY_HISTORY, {
    "version": TEXT, "from_status": TEXT, "to_status": TEXT, "ds": DATE, "actor": TEXT, "reason": TEXT,
    "changed_at": TIMESTAMP,
})

PIPELINE_RUNS_SPEC = TableSpec(PIPELINE_RUNS, {
    "run_id": TEXT, "ds": DATE, "stage": TEXT, "status": TEXT, "started_at": TIMESTAMP,
    "finished_at": TIMESTAMP, "message": TEXT, "details": TEXT,
}, ("run_id", "stage"))


def contract_tables(cfg: MtrecConfig) -> list[TableSpec]:
    return [recommendations_spec(cfg), DATA_QUALITY_SPEC, MODEL_REGISTRY_SPEC, MODEL_REGISTRY_HISTORY_SPEC,
            PIPELINE_RUNS_SPEC]
