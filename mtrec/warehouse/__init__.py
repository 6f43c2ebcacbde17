"""Warehouse backends behind one protocol: DuckDB (embedded default) and SQLAlchemy (PostgreSQL)."""

from __future__ import annotations

from mtrec.config import MtrecConfig
from mtrec.errors import WarehouseError
from mtrec.schema import contract_tables, recommendations_spec
from mtrec.warehouse.base import Warehouse, as_utc, q

__all__ = ["Warehouse", "as_utc", "open_warehouse", "ensure_contract_tables", "q"]


def open_warehouse(url_or_cfg: str | MtrecConfig, *, read_only: bool = False) -> Warehouse:
    """Open the warehouse named by a URL (`duckdb:///path`, `postgresql://...`) or by a config."""
    url = url_or_cfg.resolved_warehouse_url if isinstance(url_or_cfg, MtrecConfig) else url_or_cfg
    if url.startswith("duckdb:"):
        from mtrec.warehouse.duckdb_backend import DuckDBWarehouse
        return DuckDBWarehouse(url, read_only=read_only)
    if "://" not in url:
        raise WarehouseError(f"warehouse URL {url!r} is not a URL (expected duckdb:///path or postgresql://...)")
    from mtrec.warehouse.sql_backend import SQLWarehouse
    return SQLWarehouse(url)


def ensure_contract_tables(wh: Warehouse, cfg: MtrecConfig) -> None:
    """Create the output and bookkeeping tables; add p_<task> columns for tasks added to the config."""
    for spec in contract_tables(cfg):
        wh.create_table(spec)
    rec = recommendations_spec(cfg)
    missing = {c: t for c, t in rec.columns.items() if c not in wh.columns(rec.name)}
    if missing:
        wh.add_columns(rec.name, missing)
