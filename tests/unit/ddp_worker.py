"""Started by torchrun from test_models.py: train on a toy table under DDP and report this rank's result.
With `--single` (plain python) the same training runs in one process, for comparison."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist
from sklearn.metrics import roc_auc_score

from mtrec.config import load_config
from mtrec.testing import toy_table
from mtrec.training import train_model


def main(out: Path) -> None:
    # DDP: 2 ranks x 256 rows per step; single: 512 rows per step -> the same effective batch and step count
    batch = 512 if "--single" in sys.argv else 256
    cfg = load_config(environ={}, overrides={"home": str(out), "training": {
        "epochs": 3, "batch_size": batch, "warmup_steps": 5, "learning_rate": 5e-3}})
    outcome = train_model(cfg, toy_table(4000, seed=1), None, progress=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = outcome.artifact.model.state_dict()
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().numpy().tobytes())
    holdout = toy_table(2000, seed=2)
    auc = roc_auc_score(holdout.frame["click"], outcome.artifact.predict(holdout)["click"])
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": dist.get_world_size() if dist.is_initialized() else 1, "state_sha": h.hexdigest(),
        "history": outcome.history, "holdout_auc": auc}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
