"""Shared by the repo files: the mtrec config (MTREC_CONFIG / mtrec.yaml / MTREC_* env) and its Feast objects."""

from __future__ import annotations

from mtrec.config import load_config
from mtrec.features import store
from mtrec.warehouse import open_warehouse

CONFIG = load_config()


def _objects() -> dict[str, object]:
    wh = open_warehouse(CONFIG, read_only=CONFIG.resolved_warehouse_url.startswith("duckdb:"))
    try:
        attrs = store.attributes(CONFIG, wh)
    finally:
        wh.close()
    return {obj.name: obj for obj in store.definitions(CONFIG, attrs)}


OBJECTS = _objects()
