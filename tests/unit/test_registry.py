"""Model registry: versions, exactly one champion, promotion history, as-of lookups, rollback, hash checks."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest

from mtrec.errors import ModelError
from mtrec.registry import ARCHIVED, CHALLENGER, CHAMPION, REJECTED, ModelRegistry
from mtrec.warehouse import ensure_contract_tables, open_warehouse

D = dt.date(2024, 3, 10)


class TinyArtifact:
    """Stands in for RankerArtifact where only storage matters: JSON weights, sha256 of the files."""

    def __init__(self, weights: list[float], metadata: dict | None = None) -> None:
        self.weights = weights
        self.metadata = metadata or {"model_name": "tiny"}

    @staticmethod
    def _digest(path: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()

    def save(self, directory) -> str:
        d = Path(directory)
        (d / "weights.json").write_text(json.dumps(self.weights))
        (d / "metadata.json").write_text(json.dumps(self.metadata))
        return self._digest(d)

    @classmethod
    def load(cls, directory, expected_sha256: str | None = None) -> TinyArtifact:
        d = Path(directory)
        if expected_sha256 is not None and cls._digest(d) != expected_sha256:
            raise ModelError(f"sha256 mismatch for artifact at {d}")
        return cls(json.loads((d / "weights.json").read_text()), json.loads((d / "metadata.json").read_text()))


@pytest.fixture
def registry(cfg, warehouse_url):
    cfg = cfg.model_copy(update={"warehouse_url": warehouse_url})
    wh = open_warehouse(cfg)
    ensure_contract_tables(wh, cfg)
    yield ModelRegistry(cfg, wh, artifact_cls=TinyArtifact)
    wh.close()


def _register(reg: ModelRegistry, day: dt.date, w: float = 1.0):
    return reg.register(TinyArtifact([w]), trained_through=day, train_window=(day - dt.timedelta(days=7), day - dt.timedelta(days=1)),
                        metrics={"history": [{"epoch": 1, "loss": 0.5}]})


def test_register_assigns_sortable_unique_versions_and_round_trips(registry):
    a = _register(registry, D, 1.0)
    b = _register(registry, D, 2.0)
    c = _register(registry, D + dt.timedelta(days=1), 3.0)
    assert [a.version, b.version, c.version] == sorted([a.version, b.version, c.version])
    assert len({a.version, b.version, c.version}) == 3
    assert a.version.endswith("20240310") and a.status == CHALLENGER
    assert a.train_window == (D - dt.timedelta(days=7), D - dt.timedelta(days=1))
    assert a.metrics["history"][0]["loss"] == 0.5
    assert Path(a.artifact_uri, "weights.json").exists()
    assert registry.load(b.version).weights == [2.0]
    # candidate_for: the newest challenger trained through that day
    assert registry.candidate_for(D).version == b.version
    assert registry.candidate_for(D - dt.timedelta(days=1)) is None
    assert list(registry.list()["version"]) == [a.version, b.version, c.version]


def test_exactly_one_champion_and_history(registry):
    a, b = _register(registry, D), _register(registry, D + dt.timedelta(days=1))
    assert registry.champion() is None
    registry.promote(a.version, actor="gate", reason="first", ds=D)
    registry.promote(b.version, actor="gate", reason="better", ds=D + dt.timedelta(days=1))
    statuses = registry.list().set_index("version")["status"].to_dict()
    assert statuses == {a.version: ARCHIVED, b.version: CHAMPION}
    champ = registry.champion()
    assert champ.version == b.version and champ.promoted_by == "gate" and champ.reason == "better"
    # promoting the champion again is a no-op (reruns are idempotent)
    registry.promote(b.version, actor="gate", reason="rerun", ds=D + dt.timedelta(days=1))
    assert (registry.list()["status"] == CHAMPION).sum() == 1
    hist = registry.history()
    assert list(hist[hist["to_status"] == CHAMPION]["version"]) == [a.version, b.version]
    # as-of: which champion was in force for each logical date
    assert registry.champion_as_of(D - dt.timedelta(days=1)) is None
    assert registry.champion_as_of(D).version == a.version
    assert registry.champion_as_of(D + dt.timedelta(days=5)).version == b.version


def test_failed_promotion_leaves_the_champion_untouched(registry):
    a = _register(registry, D)
    registry.promote(a.version, actor="gate", reason="first", ds=D)
    with pytest.raises(ModelError, match="unknown model version 'v9999-20240101'"):
        registry.promote("v9999-20240101", actor="cli", reason="typo")
    assert registry.champion().version == a.version


def test_reject_and_rollback_walk_back_through_champions(registry):
    a, b, c = (_register(registry, D + dt.timedelta(days=i)) for i in range(3))
    for i, v in enumerate((a, b, c)):
        registry.promote(v.version, actor="gate", reason="ok", ds=D + dt.timedelta(days=i))
    bad = _register(registry, D + dt.timedelta(days=3))
    registry.reject(bad.version, reason="floor", ds=D + dt.timedelta(days=3))
    assert registry.get(bad.version).status == REJECTED
    assert registry.candidate_for(D + dt.timedelta(days=3)) is None
    assert registry.rollback(actor="cli:me", reason="bad recs").version == b.version
    assert registry.get(c.version).status == REJECTED
    assert registry.champion_as_of(D + dt.timedelta(days=10)).version == b.version
    assert registry.rollback(actor="cli:me").version == a.version
    with pytest.raises(ModelError, match="nothing to roll back to"):
        registry.rollback(actor="cli:me")
    assert registry.champion().version == a.version
    with pytest.raises(ModelError, match="is the champion"):
        registry.reject(a.version, reason="x")


def test_tampered_artifact_is_refused(registry):
    a = _register(registry, D)
    Path(a.artifact_uri, "weights.json").write_text("[42.0]")
    with pytest.raises(ModelError, match="sha256"):
        registry.load(a.version)


def test_artifacts_on_an_fsspec_uri(cfg, tmp_path):
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"artifact_root": "memory://mtrec-models"})})
    wh = open_warehouse(cfg)
    try:
        reg = ModelRegistry(cfg, wh, artifact_cls=TinyArtifact)
        mv = _register(reg, D, 7.0)
        assert mv.artifact_uri == f"memory://mtrec-models/{mv.version}"
        assert reg.load(mv.version).weights == [7.0]
    finally:
        wh.close()
