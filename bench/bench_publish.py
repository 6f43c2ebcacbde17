"""Publish throughput: ~1M staged rows over several scenarios into daily_recommendations on DuckDB and PostgreSQL.

Each measurement runs in a fresh process (its own peak RSS). Per backend: the first publish (the partitions are
new), a republish of the same run (every partition replaced), the backend's generic replace_partition on the same
rows (pandas, for comparison) and pandas.DataFrame.to_sql with default settings (the baseline; on DuckDB through
the duckdb-engine SQLAlchemy driver). PostgreSQL runs when --postgres-url or MTREC_TEST_POSTGRES_URL is given (a
scratch schema, dropped afterwards). The baseline runs first, into daily_recommendations as
ensure_contract_tables creates it (on PostgreSQL one plain table with the primary key; the first publish then
includes converting it, still empty, to one partition per (ds, scenario)).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, peak_rss_mb  # noqa: E402

DS = dt.date(2024, 5, 10)
RUN_ID = "bench-publish"
BENCH = "publish"
TARGET_RATIO = 10.0  # publish vs to_sql with default settings


def _cfg(home: str, url: str):
    from mtrec.config import load_config

    return load_config(environ={}, overrides={"home": home, "warehouse_url": url})


def stage(home: str, scenarios: list[str], users: int, k: int) -> int:
    """Staged scores as the score stage writes them: one parquet file per scenario, then _SUCCESS.json."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtrec import schema as S
    from mtrec.steps.publish import SUCCESS_FILE, scores_dir

    cfg = _cfg(home, "duckdb:///:memory:")
    out = scores_dir(cfg, DS, RUN_ID)
    out.mkdir(parents=True, exist_ok=True)
    types = {S.TEXT: pa.string(), S.DATE: pa.date32(), S.TIMESTAMP: pa.timestamp("us", tz="UTC"),
             S.DOUBLE: pa.float64(), S.BIGINT: pa.int64()}
    schema = pa.schema([(c, types[t]) for c, t in S.recommendations_spec(cfg).columns.items()])
    counts = {}
    for i, scen in enumerate(scenarios):
        rng = np.random.default_rng(i)
        n = users * k
        cols = {
            "ds": pa.array(np.full(n, np.datetime64(DS.isoformat(), "D"))).cast(pa.date32()),
            "scenario": pa.array([scen] * n),
            "user_id": pa.array(np.char.add("u", np.repeat(np.arange(users), k).astype(str)).astype(object)),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int64), users)),
            "item_id": pa.array(np.char.add("i", rng.integers(0, 200_000, n).astype(str)).astype(object)),
            "score": pa.array(np.sort(rng.random(n).reshape(users, k), axis=1)[:, ::-1].ravel()),
        }
        for t in cfg.task_names:
            cols[S.prob_column(t)] = pa.array(rng.random(n))
        cols["model_version"] = pa.array(["v-bench"] * n)
        cols["run_id"] = pa.array([RUN_ID] * n)
        cols["created_at"] = pa.array(np.full(n, np.datetime64(f"{DS + dt.timedelta(days=1)}T01:00:00", "us")))
        table = pa.table(cols).cast(schema)
        pq.write_table(table, out / f"{scen}.parquet")
        counts[scen] = n
    (out / SUCCESS_FILE).write_text(json.dumps({"scenarios": counts, "model_version": "v-bench",
                                                "ds": DS.isoformat(), "run_id": RUN_ID}))
    return sum(counts.values())


def _worker(kind: str, home: str, url: str, rows_limit: int, queue) -> None:
    """One measurement in a fresh process: (rows, seconds, peak RSS MB)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    import pyarrow.csv  # noqa: F401 - imports are not part of the timed write
    import pyarrow.parquet as pq

    from mtrec.steps import publish
    from mtrec.warehouse import ensure_contract_tables, open_warehouse

    if url.startswith("postgres"):
        import psycopg.copy  # noqa: F401
    cfg = _cfg(home, url)
    files = sorted(publish.scores_dir(cfg, DS, RUN_ID).glob("*.parquet"))
    if kind in ("first", "republish"):
        wh = open_warehouse(cfg)
        t = time.perf_counter()
        res = publish.run(cfg, DS, run_id=RUN_ID, wh=wh)
        seconds = time.perf_counter() - t
        wh.close()
        rows = sum(res.rows.values())
    elif kind == "replace_partition":  # the backend's generic path: pandas frame, normalise, delete + insert_df
        from mtrec.schema import recommendations_spec

        wh = open_warehouse(cfg)
        spec = recommendations_spec(cfg)
        rows, seconds = 0, 0.0
        for f in files:
            df = pq.read_table(f).to_pandas()
            t = time.perf_counter()
            rows += wh.write_normalized(spec, df, {"ds": DS, "scenario": df["scenario"].iloc[0]})
            seconds += time.perf_counter() - t
        wh.close()
    elif kind == "to_sql":  # pandas defaults (method=None, chunksize=None); same rows, own table
        import sqlalchemy as sa

        df = pq.read_table(files[0]).to_pandas().iloc[:rows_limit]
        if url.startswith("sqlite"):
            con: object = sa.create_engine(url)
            table, schema = "to_sql_baseline", None
        else:
            from mtrec.warehouse.sql_backend import _split_schema

            sa_url, schema = (url, None) if url.startswith("duckdb") else _split_schema(url)
            con = sa.create_engine(sa_url)
            wh = open_warehouse(cfg)
            ensure_contract_tables(wh, cfg)  # into the contract table (same primary key), partition cleared
            wh.execute("DELETE FROM daily_recommendations")
            wh.close()
            table = "daily_recommendations"
        t = time.perf_counter()
        df.to_sql(table, con, schema=schema, if_exists="append", index=False)
        seconds = time.perf_counter() - t
        rows = len(df)
        con.dispose()
        if not url.startswith("sqlite"):
            wh = open_warehouse(cfg)
            wh.execute("DELETE FROM daily_recommendations")  # the publish runs start from an empty table
            wh.close()
    else:
        raise ValueError(kind)
    queue.put((rows, seconds, peak_rss_mb()))


def _guarded(kind: str, home: str, url: str, rows_limit: int, queue) -> None:
    try:
        _worker(kind, home, url, rows_limit, queue)
    except BaseException:  # noqa: BLE001 - report the child's failure instead of leaving the parent waiting
        import traceback

        queue.put(traceback.format_exc())


def measure(kind: str, home: str, url: str, rows_limit: int = 0) -> tuple[int, float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_guarded, args=(kind, home, url, rows_limit, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    if isinstance(result, str):
        raise RuntimeError(f"{kind} on {url.split(':')[0]} failed:\n{result}")
    return result


def report(backend: str, kind: str, rows: int, seconds: float, rss: float, baseline: float | None) -> float:
    rps = rows / seconds
    name = f"{backend}_{kind}"
    emit(BENCH, f"{name}_rows", rows, "rows", "none", None)
    emit(BENCH, f"{name}_seconds", seconds, "s", "none", None)
    emit(BENCH, f"{name}_rows_per_second", rps, "rows/s",
         f"pandas.to_sql defaults (target {TARGET_RATIO:g}x)" if baseline else "none", baseline)
    emit(BENCH, f"{name}_peak_rss_mb", rss, "MB", "none", None)
    return rps


def run_backend(backend: str, home: str, url: str, baseline_url: str, baseline_rows: int, compare: bool) -> None:
    b_rows, b_sec, b_rss = measure("to_sql", home, baseline_url, baseline_rows)
    base = report(backend, "to_sql_baseline", b_rows, b_sec, b_rss, None)
    for kind in ("first", "republish"):
        report(backend, f"publish_{kind}", *measure(kind, home, url), base)
    if compare:
        report(backend, "backend_replace_partition", *measure("replace_partition", home, url), base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=25_000, help="users per scenario")
    ap.add_argument("--k", type=int, default=10, help="recommendations per user")
    ap.add_argument("--scenarios", default="home,search,video,live", help="comma-separated")
    ap.add_argument("--baseline-rows", type=int, default=100_000, help="rows written by the to_sql baseline")
    ap.add_argument("--postgres-url", default=os.environ.get("MTREC_TEST_POSTGRES_URL"))
    ap.add_argument("--no-compare", action="store_true", help="skip the backend replace_partition comparison")
    ap.add_argument("--skip-duckdb", action="store_true")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mtrec-bench-publish-"))
    home = str(root / "home")
    try:
        rows = stage(home, args.scenarios.split(","), args.users, args.k)
        emit(BENCH, "staged_rows", rows, "rows", "none", None)
        if not args.skip_duckdb:
            url = f"duckdb:///{root / 'wh.duckdb'}"
            run_backend("duckdb", home, url, url, args.baseline_rows, not args.no_compare)
        if args.postgres_url:
            import sqlalchemy as sa

            schema = f"bench_publish_{secrets.token_hex(4)}"
            sep = "&" if "?" in args.postgres_url else "?"
            url = f"{args.postgres_url}{sep}schema={schema}"
            try:
                run_backend("postgres", home, url, url, args.baseline_rows, not args.no_compare)
            finally:
                eng = sa.create_engine(args.postgres_url.split("?")[0].replace("postgresql://", "postgresql+psycopg://", 1))
                with eng.begin() as c:
                    c.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                eng.dispose()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
