"""Run expectation suites with Great Expectations 1.x on pandas frames and build the Data Docs site."""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mtrec.validation.results import CheckResult

log = logging.getLogger(__name__)

SAMPLE_VALUES = 3


@dataclass
class Suite:
    """One GX suite (named after what it checks) run on one frame.

    Every expectation carries `meta`: check (our stable name), table, column (what the user sees),
    threshold (human-readable), and optionally observed (for metric expectations, the value in words).
    """

    name: str
    frame: pd.DataFrame
    expectations: list[Any] = field(default_factory=list)


def _quiet_gx() -> None:
    # No usage statistics leave the machine, and GX's own logs stay out of ours.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _short(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "null"
        return f"{value:.6g}"
    if value is None or (isinstance(value, type(pd.NaT)) and value is pd.NaT):
        return "null"
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    s = str(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "error")
    for sub in info.values():
        if isinstance(sub, dict) and sub.get("raised_exception"):
            return str(sub.get("exception_message") or "error")
    return None


def _observed(gx_type: str, meta: dict[str, Any], result: dict[str, Any], success: bool) -> str:
    if "observed" in meta:
        return str(meta["observed"])
    if gx_type == "expect_column_to_exist":
        return "present" if success else "missing"
    if result.get("unexpected_count") is not None and result.get("element_count") is not None:
        n, total = int(result["unexpected_count"]), int(result["element_count"])
        if n == 0:
            return f"0 of {total} rows"
        sample = result.get("partial_unexpected_list") or []
        seen: list[str] = []
        for v in sample:
            s = _short(v)
            if s not in seen:
                seen.append(s)
        eg = f", e.g. {', '.join(seen[:SAMPLE_VALUES])}" if seen else ""
        return f"{n} of {total} rows ({100.0 * n / max(total, 1):.2f}%){eg}"
    if "observed_value" in result:
        return _short(result["observed_value"])
    return "ok" if success else "failed"


def _details(gx_type: str, kwargs: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    keep = {k: result[k] for k in ("element_count", "unexpected_count", "unexpected_percent", "observed_value")
            if k in result}
    if result.get("partial_unexpected_counts"):
        keep["unexpected_sample"] = [{"value": _short(c.get("value")), "count": c.get("count")}
                                     for c in result["partial_unexpected_counts"][:10]]
    args = {k: (_short(v) if not isinstance(v, list | int | bool) else v) for k, v in kwargs.items()
            if k not in ("batch_id",)}
    if isinstance(args.get("value_set"), list) and len(args["value_set"]) > 50:
        args["value_set"] = args["value_set"][:50] + ["..."]
    return {"gx_expectation": gx_type, "kwargs": args, **keep}


def run_suites(suites: list[Suite], data_docs_dir: Path | None = None) -> list[CheckResult]:
    """Validate every suite on its frame in one ephemeral GX context; optionally build Data Docs there."""
    _quiet_gx()
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    _quiet_gx()  # again: importing GX configures its own loggers
    sites = {}
    if data_docs_dir is not None:
        if data_docs_dir.exists():
            shutil.rmtree(data_docs_dir)  # a rerun of ds replaces its site
        data_docs_dir.mkdir(parents=True, exist_ok=True)
        sites["mtrec"] = {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(data_docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    # In-memory stores and no temporary docs site: nothing accumulates between runs, nothing lands in /tmp.
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               data_docs_sites=sites, progress_bars=ProgressBarsConfig(globally=False),
                               analytics_enabled=False)
    ctx = gx.get_context(mode="ephemeral", project_config=config)
    source = ctx.data_sources.add_pandas("mtrec")
    out: list[CheckResult] = []
    for suite in suites:
        if not suite.expectations:
            continue
        batch = source.add_dataframe_asset(suite.name).add_batch_definition_whole_dataframe("partition")
        gx_suite = ctx.suites.add(gx.ExpectationSuite(name=suite.name))
        for exp in suite.expectations:
            gx_suite.add_expectation(exp)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=batch, suite=gx_suite))
        res = vd.run(batch_parameters={"dataframe": suite.frame}, result_format="SUMMARY")
        for r in res.results:
            conf = r.expectation_config
            meta = dict(conf.meta or {})
            result = dict(r.result or {})
            error = _exception_message(r.exception_info)
            observed = f"could not evaluate: {error}" if error else _observed(conf.type, meta, result, r.success)
            out.append(CheckResult(
                table=meta.get("table", suite.name), expectation=meta.get("check", conf.type),
                column=meta.get("column", conf.kwargs.get("column") or ""),
                severity=str(getattr(conf.severity, "value", conf.severity or "critical")),
                success=bool(r.success) and not error, observed=observed, threshold=str(meta.get("threshold", "")),
                details=_details(conf.type, dict(conf.kwargs), result) | ({"error": error} if error else {}),
            ))
    if sites:
        try:
            ctx.build_data_docs(site_names=["mtrec"])
        except Exception:  # noqa: BLE001 - Data Docs are a courtesy; the results and our report are the record
            log.warning("could not build Great Expectations Data Docs in %s", data_docs_dir, exc_info=True)
    return out
