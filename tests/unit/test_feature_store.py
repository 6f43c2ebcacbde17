"""The offline store's modules are preloaded by the score stage (one retrieval's cold start, off the critical path)."""

import subprocess
import sys

import pytest


def test_preload_imports_every_listed_module():
    # in a fresh interpreter: a listed module that no longer exists (a Feast or ibis upgrade) is skipped silently
    # by the stage, so this is where it shows
    code = ("import sys\nfrom mtrec.features import store as FS\nFS.preload_offline_store()\n"
            "missing = [m for m in FS.OFFLINE_STORE_MODULES if m not in sys.modules]\n"
            "print(missing)\nsys.exit(1 if missing else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


def test_preload_survives_a_missing_module(monkeypatch, caplog):
    import logging

    from mtrec.features import store as FS

    monkeypatch.setattr(FS, "OFFLINE_STORE_MODULES", ("mtrec_no_such_module_xyz",))
    with caplog.at_level(logging.DEBUG, logger=FS.log.name):
        FS.preload_offline_store()  # raises nothing: the first retrieval imports what it needs
    assert [r.getMessage() for r in caplog.records] == ["offline store module mtrec_no_such_module_xyz not preloaded"]


def _apply(cfg, store, attrs):
    """Apply the definitions of `attrs`, with a one-row Parquet file behind each source (Feast reads their schema)."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq
    from feast import FeatureView

    from mtrec.features import store as FS

    types = {"String": pa.string(), "Float64": pa.float64(), "Bool": pa.bool_(), "Array(Float32)": pa.list_(pa.float32())}
    for obj in FS.definitions(cfg, attrs):
        if isinstance(obj, FeatureView):
            cols = {k: pa.array(["x"]) for k in obj.join_keys}
            cols[obj.batch_source.timestamp_field] = pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.UTC)])
            cols.update({f.name: pa.array([None], types[str(f.dtype)]) for f in obj.schema if f.name not in cols})
            path = FS.data_dir(cfg) / obj.batch_source.path.split("/")[-2] / "x.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(cols), path)
    store.apply(FS.definitions(cfg, attrs))


def test_service_features_follow_the_registry(tmp_path, monkeypatch):
    """The service's feature references are kept on the store between calls, also when the store reloads the
    same registry (as its retrievals do), until the registry changes: a re-apply with another attribute column,
    through the same store or another one, shows at once."""
    from mtrec.config import load_config
    from mtrec.features import store as FS

    cfg = load_config(environ={}, overrides={"home": str(tmp_path)})
    store = FS.feature_store(cfg)
    _apply(cfg, store, FS.Attributes(("country",), ("age",), ("genre",), ()))
    first = FS.service_features(store, "user")
    assert "user_attributes:u_age" in first and "user_attributes:u_tenure" not in first
    with monkeypatch.context() as m:  # from the memo: the service is not rebuilt
        m.setattr(FS, "_service_features", lambda *a: pytest.fail("rebuilt for an unchanged registry"))
        assert FS.service_features(store, "user") == first
        store.refresh_registry()  # the same registry, reloaded
        assert FS.service_features(store, "user") == first
    _apply(cfg, store, FS.Attributes(("country",), ("age", "tenure"), ("genre",), ()))
    assert sorted(FS.service_features(store, "user")) == sorted(first + ["user_attributes:u_tenure"])
    other = FS.feature_store(cfg)
    _apply(cfg, other, FS.Attributes(("country",), ("tenure",), ("genre",), ()))
    refs = FS.service_features(store, "user")
    assert "user_attributes:u_tenure" in refs and "user_attributes:u_age" not in refs
    assert FS.service_features(store, "item") == FS._service_features(other, "item")


def test_snapshot_files_are_the_days_a_window_can_match(tmp_path):
    """Partition d holds values stamped within [d, d + 1 day]: kept when that meets [lo, hi]; a glob that is not
    all `ds=` partitions, or leaves nothing, is read whole (None)."""
    import datetime as dt

    from mtrec.features.offline import snapshot_files

    for d in range(1, 8):
        (tmp_path / f"ds=2026-01-0{d}.parquet").touch()
    utc = dt.UTC

    def days(lo, hi):
        got = snapshot_files(str(tmp_path / "*.parquet"), lo, hi)
        return None if got is None else [int(f[-10:-8]) for f in got]

    end_of_5 = dt.datetime(2026, 1, 6, tzinfo=utc)
    assert days(end_of_5 - dt.timedelta(days=1), end_of_5) == [4, 5, 6]
    assert days(end_of_5 - dt.timedelta(hours=1), end_of_5) == [5, 6]
    assert days(None, end_of_5) == [1, 2, 3, 4, 5, 6]
    assert days(dt.datetime(2025, 1, 1, tzinfo=utc), dt.datetime(2025, 1, 2, tzinfo=utc)) is None
    (tmp_path / "all.parquet").touch()
    assert days(end_of_5 - dt.timedelta(days=1), end_of_5) is None


def test_optimizer_rules_are_off_for_the_block_only():
    """The one-instant retrieval's query runs with DuckDB's top-N window rewrite off; the connection's own
    setting is back afterwards (also after a failure), and a DuckDB that does not know a rule runs as it is."""
    import duckdb

    from mtrec.features.offline import SLOWER_REWRITES, _optimizers_off

    con = duckdb.connect()

    def off() -> str:
        return con.execute("SELECT current_setting('disabled_optimizers')").fetchall()[0][0]

    con.execute("SET disabled_optimizers = 'join_order'")
    with _optimizers_off(con, SLOWER_REWRITES):
        assert sorted(off().split(",")) == sorted(["join_order", *SLOWER_REWRITES])
    assert off() == "join_order"
    with pytest.raises(RuntimeError), _optimizers_off(con, SLOWER_REWRITES):
        raise RuntimeError("query failed")
    assert off() == "join_order"
    con.execute("RESET disabled_optimizers")
    with _optimizers_off(con, SLOWER_REWRITES):
        assert off() == ",".join(SLOWER_REWRITES)
    assert off() == ""
    with _optimizers_off(con, ("no_such_rule",)):
        assert off() == ""
