"""The offline store's modules are preloaded by the score stage (one retrieval's cold start, off the critical path)."""

import subprocess
import sys


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
