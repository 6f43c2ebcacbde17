"""The training loop: in-memory tensors sliced by index, AdamW with warm-up then cosine, gradient clipping,
early stopping on a validation day, fixed or uncertainty task weights, CUDA + bf16 autocast when present,
DistributedDataParallel when started under torchrun (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mtrec
from mtrec.config import MtrecConfig
from mtrec.errors import ModelError
from mtrec.models import ModelSpec, build_model
from mtrec.training.artifact import RankerArtifact, pick_device
from mtrec.training.encoding import FeatureEncoder
from mtrec.training.metrics import evaluate_predictions, mean_auc

log = logging.getLogger(__name__)
EPS = 1e-7


@dataclass
class TrainOutcome:
    artifact: RankerArtifact
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time of the loop (all threads): throughput insensitive to other jobs
    samples_per_second: float = 0.0
    best_epoch: int = 0
    valid_metrics: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(mtrec.__file__)).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"mtrec {mtrec.__version__}" + (f" ({sha})" if sha else "")


class TaskLoss(nn.Module):
    """Sum over tasks of masked binary cross-entropy (rows without a label do not count).

    fixed: weight_t * BCE_t. uncertainty (Kendall et al. 2018): exp(-s_t) * BCE_t + s_t with learned s_t.
    """

    def __init__(self, tasks: list[str], weights: dict[str, float], mode: str) -> None:
        super().__init__()
        self.tasks, self.mode = tasks, mode
        self.register_buffer("weights", torch.tensor([weights.get(t, 1.0) for t in tasks], dtype=torch.float32))
        self.log_vars = nn.Parameter(torch.zeros(len(tasks))) if mode == "uncertainty" else None

    def forward(self, probs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        total = torch.zeros((), device=labels.device)
        parts = []
        for j, t in enumerate(self.tasks):
            y = labels[:, j]
            ok = torch.isfinite(y)
            if not bool(ok.any()):
                parts.append(float("nan"))
                continue
            p = probs[t].float()[ok].clamp(EPS, 1 - EPS)
            bce = F.binary_cross_entropy(p, y[ok])
            parts.append(float(bce.detach()))
            if self.log_vars is not None:
                total = total + torch.exp(-self.log_vars[j]) * bce + self.log_vars[j]
            else:
                total = total + self.weights[j] * bce
        return total, parts


def _schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group when started under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def make_spec(cfg: MtrecConfig, encoder: FeatureEncoder, name: str) -> ModelSpec:
    t = cfg.training
    return ModelSpec(
        name=name, tasks=list(encoder.tasks), parents={x.name: x.depends_on for x in cfg.tasks if x.name in encoder.tasks},
        n_users=encoder.cardinality("user_id"), n_items=encoder.cardinality("item_id"),
        n_scenarios=encoder.n_scenarios,
        user_cat=[encoder.cardinality(c) for c in encoder.user_categorical],
        item_cat=[encoder.cardinality(c) for c in encoder.item_categorical],
        user_num=encoder.numeric_width("user"), item_num=encoder.numeric_width("item"),
        text_dim=encoder.text_dim, sequence_length=encoder.sequence_length,
        embedding_dim=t.embedding_dim, hidden_dims=list(t.hidden_dims), match=True,
        user_rates=_rate_columns(encoder, encoder.user_numeric), item_rates=_rate_columns(encoder, encoder.item_numeric))


def _rate_columns(encoder: FeatureEncoder, columns: list[str]) -> list[list[float]]:
    """[position in the encoded numeric block, mean, std] of every smoothed-rate column (values in [0, 1])."""
    out, pos = [], 0
    for c in columns:
        st = encoder.numeric[c]
        if "_rate_" in c and not st.log:
            out.append([float(pos), st.mean, st.std])
        pos += 1 + int(st.has_missing)
    return out


def _param_groups(model: nn.Module, criterion: nn.Module, t) -> list[dict[str, Any]]:
    """AdamW groups: user/item id embedding tables get `id_weight_decay` (decoupled decay shrinks every row at
    every step, so ids seen in few batches stay near zero: the model leans on attributes and sequences for
    them), everything else `weight_decay`."""
    ids, rest = [], []
    for name, p in model.named_parameters():
        (ids if name.endswith(("inputs.user.weight", "inputs.item.weight")) else rest).append(p)
    rest += list(criterion.parameters())
    return [{"params": rest, "weight_decay": t.weight_decay},
            {"params": ids, "weight_decay": t.id_weight_decay}]


class _Packed:
    """Every row tensor of a training set packed into one int32 and one float32 matrix, so that a batch is two
    gathers (plus the int64 conversion) instead of one per feature tensor: the data path stays a few percent of
    a training step."""

    def __init__(self, tensors: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        n = len(labels)
        self.layout: list[tuple[str, bool, int, int, tuple[int, ...]]] = []
        ints, floats, wi, wf = [], [labels.view(n, -1)], 0, labels.view(n, -1).shape[1]
        self.n_labels = wf
        for k, v in tensors.items():
            flat = v.reshape(n, -1)
            is_int = not v.is_floating_point()
            start = wi if is_int else wf
            (ints if is_int else floats).append(flat.to(torch.int32) if is_int else flat.float())
            if is_int:
                wi += flat.shape[1]
            else:
                wf += flat.shape[1]
            self.layout.append((k, is_int, start, flat.shape[1], tuple(v.shape[1:])))
        self.ints = torch.cat(ints, 1) if ints else torch.zeros(n, 0, dtype=torch.int32)
        self.floats = torch.cat(floats, 1)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ints = self.ints[idx].to(device, non_blocking=True).long()
        floats = self.floats[idx].to(device, non_blocking=True)
        out = {}
        for k, is_int, start, width, shape in self.layout:
            src = ints if is_int else floats
            out[k] = src[:, start:start + width].reshape(len(idx), *shape)
        return out, floats[:, :self.n_labels]


def _shard(perm: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of an epoch's permutation; every rank gets the same number of rows (wrap-around)."""
    if world == 1:
        return perm
    per = math.ceil(len(perm) / world)
    padded = torch.cat([perm, perm[: per * world - len(perm)]])
    return padded[rank * per:(rank + 1) * per]


def train_model(cfg: MtrecConfig, table, valid=None, *, init_from: RankerArtifact | None = None,
                model_name: str | None = None, progress: bool = True) -> TrainOutcome:
    """Fit a ranker on a labelled FeatureTable; `valid` (one later day) drives early stopping.

    `init_from` warm-starts from a previous artifact (same vocabularies: new ids fall into the OOV index).
    Under torchrun every rank calls this with the same table; each trains on its shard of every epoch
    and gradients are averaged (DDP), so all ranks end with the same weights.
    """
    t = cfg.training
    name = model_name or t.model
    if name == "popularity":
        from mtrec.errors import ConfigError

        raise ConfigError("config key training.model: popularity needs no training (it is the gate's baseline); "
                          "choose msmt, shared_bottom, mmoe or single_task")
    if len(table) == 0 or not table.labelled:
        raise ModelError("the training set is empty or has no label columns", table="events")
    gen = seed_everything(t.seed)
    torch.set_num_threads(t.num_threads or 1)  # small dense layers: extra intra-op threads mostly spin
    rank, world = _distributed()
    device = pick_device(t.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)

    if init_from is not None and init_from.model_name == name:
        encoder, spec = init_from.encoder, init_from.spec
    else:
        encoder = FeatureEncoder.fit(table, min_id_count=t.min_id_count, id_buckets=t.id_buckets,
                                     scenarios=cfg.scenarios)
        spec = make_spec(cfg, encoder, name)
        init_from = None
    model = build_model(spec)
    if init_from is not None:
        model.load_state_dict(init_from.model.state_dict())
    model.to(device)
    tensors, text = encoder.transform(table)
    text = text.to(device)
    labels = tensors.pop("labels")
    packed = _Packed(tensors, labels)
    del tensors
    vtensors = vtext = None
    if valid is not None and len(valid) and valid.labelled:
        vtensors, vtext = encoder.transform(valid, labels=False)

    criterion = TaskLoss(spec.tasks, {x.name: x.weight for x in cfg.tasks}, t.task_weighting).to(device)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = list(model.parameters()) + list(criterion.parameters())
    optimizer = torch.optim.AdamW(_param_groups(model, criterion, t), lr=t.learning_rate)
    n = len(labels)
    steps_per_epoch = math.ceil(math.ceil(n / world) / t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    # small runs (tests, incremental updates) must not spend their whole budget warming up
    scheduler = _schedule(optimizer, min(t.warmup_steps, total_steps // 5), total_steps)
    autocast = device.type == "cuda"

    history: list[dict[str, Any]] = []
    best_state, best_score, best_epoch, bad_epochs = None, -math.inf, 0, 0
    best_metrics: dict[str, Any] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    seen = 0
    from tqdm.auto import tqdm

    for epoch in range(1, t.epochs + 1):
        net.train()
        perm = _shard(torch.randperm(n, generator=gen), rank, world)
        bar = tqdm(range(0, len(perm), t.batch_size), desc=f"train {name} epoch {epoch}/{t.epochs}",
                   disable=not progress or rank != 0, leave=False, mininterval=1.0, unit="batch")
        total, count, epoch_start = 0.0, 0, time.perf_counter()
        for start in bar:
            idx = perm[start:start + t.batch_size]
            batch, y = packed.batch(idx, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                probs = net(batch, text)
            loss, _ = criterion({k: v.float() for k, v in probs.items()}, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            seen += len(idx) * world
            if (start // t.batch_size) % 25 == 24:
                bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": total / max(count, 1),
                               "lr": optimizer.param_groups[0]["lr"],
                               "seconds": round(time.perf_counter() - epoch_start, 3)}
        score = -row["train_loss"]
        if vtensors is not None:
            art = RankerArtifact(model, encoder, spec).to(device)
            preds = art.predict_tensors(vtensors, vtext)
            metrics = evaluate_predictions(valid, preds, spec.tasks)
            row["valid_mean_auc"] = mean_auc(metrics, min_positives=5)
            row["valid_logloss"] = float(np.nanmean([m["logloss"] for m in metrics["__all__"].values()]))
            score = row["valid_mean_auc"] if math.isfinite(row["valid_mean_auc"]) else -row["valid_logloss"]
        history.append(row)
        if rank == 0:
            log.info("epoch %d/%d: %s", epoch, t.epochs,
                     ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                               if k != "epoch"))
        # Keep the latest epoch within `early_stopping_tolerance` of the best validation score: one validation
        # day is noisy, and the later epochs are the low-learning-rate end of the schedule.
        improved = score > best_score + 1e-5
        tolerance = t.early_stopping_tolerance if vtensors is not None else 0.0
        if improved or score >= best_score - tolerance:
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
            if vtensors is not None:
                best_metrics = metrics
        if improved:
            best_score, bad_epochs = score, 0
        else:
            bad_epochs += 1
            if vtensors is not None and bad_epochs > t.early_stopping_patience:
                log.info("early stopping after epoch %d (kept epoch %d)", epoch, best_epoch)
                break
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu").eval()
    meta = {
        "model_name": name, "feature_service": table.feature_service, "tasks": spec.tasks,
        "task_parents": spec.parents, "train_rows": n, "valid_rows": len(valid) if valid is not None else 0,
        "train_days": sorted({str(d) for d in table.frame["ds"].unique()}) if "ds" in table.frame else [],
        "history": history, "best_epoch": best_epoch, "valid_metrics": best_metrics,
        "training": t.model_dump(), "code_version": code_version(), "device": str(device), "world_size": world,
        "warm_start": init_from is not None, "text_encoder": getattr(table.item_embeddings, "encoder_id", None),
    }
    artifact = RankerArtifact(model, encoder, spec, meta)
    return TrainOutcome(artifact=artifact, history=history, seconds=seconds, cpu_seconds=cpu_seconds,
                        samples_per_second=seen / max(seconds, 1e-9), best_epoch=best_epoch,
                        valid_metrics=best_metrics)
