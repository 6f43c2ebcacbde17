"""Config loading: defaults, YAML, MTREC_* overrides, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from mtrec.config import load_config
from mtrec.errors import ConfigError


def test_defaults_and_env_overrides(tmp_path):
    cfg = load_config(environ={"MTREC_HOME": str(tmp_path), "MTREC_TRAINING__EPOCHS": "7",
                               "MTREC_SCORING__TOP_K": "5", "MTREC_TEST_POSTGRES_URL": "ignored"})
    assert cfg.training.epochs == 7
    assert cfg.scoring.top_k == 5
    assert cfg.resolved_warehouse_url == f"duckdb:///{tmp_path.resolve()}/warehouse.duckdb"
    assert cfg.task_names == ["click", "like"]
    assert cfg.tasks[1].depends_on == "click"


def test_yaml_then_env_precedence(tmp_path):
    path = tmp_path / "mtrec.yaml"
    path.write_text("scoring:\n  top_k: 3\ntasks:\n  - {name: watch}\n  - {name: share, depends_on: watch}\n")
    cfg = load_config(path, environ={"MTREC_SCORING__TOP_K": "4"})
    assert cfg.scoring.top_k == 4
    assert cfg.task_names == ["watch", "share"]
    assert cfg.fusion_weights("anything") == {"watch": 1.0, "share": 1.0}


@pytest.mark.parametrize(("overrides", "environ", "key"), [
    ({"training": {"epoch": 3}}, {}, "training.epoch"),
    ({}, {"MTREC_TRAINING__BATCH_SIZE": "lots"}, "training.batch_size"),
    ({"tasks": [{"name": "like", "depends_on": "click"}]}, {}, "tasks"),
    ({"tasks": [{"name": "drop table"}]}, {}, "tasks.0.name"),
    ({"scoring": {"fusion": {"home": {"buy": 1.0}}}}, {}, "scoring"),
    ({"online_store": {"type": "memcached"}}, {}, "online_store.type"),
    ({"scoring": {"top_k": 0}}, {}, "scoring.top_k"),
])
def test_invalid_config_names_the_key(overrides, environ, key):
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ, overrides=overrides)
    message = str(info.value)
    assert f"config key {key}:" in message
    assert "\n" not in message


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "mtrec.yaml"
    path.write_text("scoring: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", environ={})
