"""The evaluate stage with the real model: a buggy champion replaced, a shuffled-label candidate gated, rollback."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from mtrec.warehouse import ensure_contract_tables, open_warehouse

END = dt.date(2024, 5, 10)

# The model, the training-set builder and the generator are built by other engineers in parallel.
if not hasattr(pytest.importorskip("mtrec.training"), "train_model"):
    pytest.skip("the model (mtrec.training.train_model) has not landed yet", allow_module_level=True)
pytest.importorskip("mtrec.features.training_set", reason="the training-set builder has not landed yet")
pytest.importorskip("mtrec.data.synthetic", reason="the synthetic generator has not landed yet")


def _shuffled_label_model(cfg, wh, seed: int):
    """A model trained on the right features but labels permuted across rows (all tasks together)."""
    from mtrec.features.training_set import build_training_set
    from mtrec.steps.train import windows
    from mtrec.training import train_model

    w = windows(cfg, END)
    table = build_training_set(cfg, wh, w.train_start, w.train_end)
    perm = np.random.default_rng(seed).permutation(len(table))
    labels = table.frame[cfg.task_names].to_numpy()[perm]
    table.frame[cfg.task_names] = labels
    return train_model(cfg, table, None).artifact, (w.train_start, w.train_end)


@pytest.mark.slow
def test_buggy_champion_replaced_shuffled_candidate_gated_and_rollback(cfg, tmp_path):
    from mtrec.data.generate import generate_into_warehouse
    from mtrec.registry import ARCHIVED, CHAMPION, REJECTED, ModelRegistry
    from mtrec.steps import evaluate, features, train

    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"train_days": 5, "epochs": 2}),
                                 "gate": cfg.gate.model_copy(update={"min_positives": 20})})
    generate_into_warehouse(cfg, users=300, items=150, days=7, end_date=END, seed=5, progress=False)
    features.run(cfg, END)  # the training sets read through the Feast feature service
    wh = open_warehouse(cfg)
    try:
        ensure_contract_tables(wh, cfg)
        reg = ModelRegistry(cfg, wh)

        # 1. a planted bug (labels shuffled) reaches production only by force, and the record says so
        bug, window = _shuffled_label_model(cfg, wh, seed=1)
        buggy = reg.register(bug, trained_through=END, train_window=window)
        forced = evaluate.run(cfg, END, wh=wh, force=True, reason="planted bug for the test")
        assert forced.decision == "blessed" and forced.candidate == buggy.version
        ev = json.loads(Path(forced.evaluation_path).read_text())
        assert ev["forced"] is True and ev["gate_decision"] == "rejected"
        assert "forced promotion: planted bug for the test" in ev["reasons"][0]
        assert "champion" not in ev["metrics"] and "popularity" in ev["metrics"]["baselines"]
        assert reg.champion().version == buggy.version

        # 2. the fixed model (real labels) beats the buggy champion on the same holdout and is promoted
        trained = train.run(cfg, END, wh=wh, retrain="always")
        good = evaluate.run(cfg, END, wh=wh)
        assert good.candidate == trained.version
        assert good.decision == "blessed", good.reasons
        ev = json.loads(Path(good.evaluation_path).read_text())
        assert ev["champion"]["version"] == buggy.version and "champion" in ev["metrics"]
        assert ev["holdout"]["first_day"] == ev["holdout"]["last_day"] == END.isoformat()
        assert Path(good.report_path).exists() and good.artifacts["report"] == good.report_path
        assert reg.champion().version == trained.version and reg.get(buggy.version).status == ARCHIVED

        # 3. a shuffled-label candidate is rejected, the stage is gated (not failed), the champion stays
        for seed in (2, 3):
            shuffled, window = _shuffled_label_model(cfg, wh, seed=seed)
            cand = reg.register(shuffled, trained_through=END, train_window=window)
            gated = evaluate.run(cfg, END, wh=wh)
            assert gated.decision == "rejected" and gated.status == "gated" and gated.ok
            assert gated.candidate == cand.version and reg.get(cand.version).status == REJECTED
            assert reg.champion().version == trained.version
            assert reg.champion_as_of(END).version == trained.version
            manifest = json.loads((Path(gated.evaluation_path).parent / "manifest.json").read_text())
            assert manifest["decisions"]["evaluate"] == "rejected"
            assert manifest["artifacts"]["evaluate.evaluation"] == gated.evaluation_path

        # 3b. a candidate with randomized weights is rejected too, and the next scoring run uses the champion
        import torch

        from mtrec.steps import score

        randomized = reg.load(trained.version)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in randomized.model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        cand = reg.register(randomized, trained_through=END, train_window=window)
        gated = evaluate.run(cfg, END, wh=wh)
        assert gated.decision == "rejected" and reg.get(cand.version).status == REJECTED
        scored = score.run(cfg, END, wh=wh, scenarios=["home"], run_id="after-gate")
        assert scored.model_version == trained.version == reg.champion().version

        # 4. rollback restores the previous champion for the next scoring run
        back = reg.rollback(actor="test", reason="bad recommendations reported")
        assert back.version == buggy.version and reg.champion().status == CHAMPION
        assert reg.champion_as_of(END).version == buggy.version
        assert reg.get(trained.version).status == REJECTED
        assert score.run(cfg, END, wh=wh, scenarios=["home"], run_id="after-rollback").model_version == buggy.version
    finally:
        wh.close()
