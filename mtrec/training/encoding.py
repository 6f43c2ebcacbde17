"""FeatureTable -> tensors: vocabularies with an OOV index, normalized numerics, sequences and text indices.

Index conventions for every id/categorical column: 0 = padding (sequences only), 1 = out-of-vocabulary or
missing, 2.. = known values. Unseen users (cold start, anonymous) and new items fall into the OOV index, so the
model leans on attributes, popularity aggregates and the title embedding for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from mtrec.errors import ModelError
from mtrec.features.frame import CodedSequences

PAD, OOV = 0, 1
CLIP = 5.0


def _vocab(values: pd.Series, min_count: int) -> list[str]:
    counts = values[values.notna() & (values.astype(str) != "")].astype(str).value_counts()
    keep = counts[counts >= min_count]
    return sorted(keep.index.tolist())


def _lookup(vocab: list[str] | pd.Index, values: Any, buckets: int = 0) -> np.ndarray:
    """Index of each value: 2 + position in the vocabulary (or 2 + hash bucket), OOV for unknown/missing."""
    s = pd.Series(np.asarray(values, dtype=object))
    text = s.astype(str)
    missing = s.isna().to_numpy() | (text == "").to_numpy()
    if buckets > 0:
        h = pd.util.hash_array(text.to_numpy(dtype=object), categorize=False)
        idx = 2 + (h % np.uint64(buckets)).astype(np.int64)
    else:
        index = vocab if isinstance(vocab, pd.Index) else pd.Index(vocab)
        pos = index.get_indexer(text)
        idx = np.where(pos >= 0, pos + 2, OOV).astype(np.int64)
    idx[missing] = OOV
    return idx


def _lookup_few(vocab: list[str] | pd.Index, values: Any) -> np.ndarray:
    """`_lookup` of a column with few distinct values (attributes, scenarios): each one looked up once."""
    codes, uniques = pd.factorize(np.asarray(values, dtype=object))  # missing values: code -1
    if not len(uniques):
        return np.full(len(codes), OOV, np.int64)
    return np.where(codes >= 0, _lookup(vocab, uniques)[np.maximum(codes, 0)], OOV).astype(np.int64)


@dataclass
class NumericStats:
    log: bool
    mean: float
    std: float
    has_missing: bool


class FeatureEncoder:
    """Fitted on a training FeatureTable; serialised into the model artifact (JSON, no pickle)."""

    def __init__(self, *, tasks: list[str], user_categorical: list[str], user_numeric: list[str],
                 item_categorical: list[str], item_numeric: list[str], vocabs: dict[str, list[str]],
                 scenarios: list[str], numeric: dict[str, NumericStats], id_buckets: int, text_dim: int,
                 sequence_length: int) -> None:
        self.tasks = tasks
        self.user_categorical, self.user_numeric = user_categorical, user_numeric
        self.item_categorical, self.item_numeric = item_categorical, item_numeric
        self.vocabs, self.scenarios, self.numeric = vocabs, scenarios, numeric
        self.id_buckets, self.text_dim, self.sequence_length = id_buckets, text_dim, sequence_length
        self._index = {k: pd.Index(v) for k, v in vocabs.items()}

    # -- fitting ---------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, table, *, min_id_count: int = 2, id_buckets: int = 0,
            scenarios: list[str] | None = None) -> FeatureEncoder:
        f = table.frame
        vocabs: dict[str, list[str]] = {}
        if id_buckets == 0:
            vocabs["user_id"] = _vocab(f["user_id"], min_id_count)
            vocabs["item_id"] = _vocab(f["item_id"], min_id_count)
        for c in table.user_categorical + table.item_categorical:
            vocabs[c] = _vocab(f[c], 1)
        numeric: dict[str, NumericStats] = {}
        for c in table.user_numeric + table.item_numeric:
            x = pd.to_numeric(f[c], errors="coerce").to_numpy(np.float64)
            ok = np.isfinite(x)
            v = x[ok]
            log = bool(len(v) and v.min() >= 0 and np.quantile(v, 0.99) > 10.0)
            if log:
                v = np.log1p(v)
            mean = float(v.mean()) if len(v) else 0.0
            std = float(v.std()) if len(v) else 1.0
            numeric[c] = NumericStats(log=log, mean=mean, std=std if std > 1e-6 else 1.0, has_missing=bool((~ok).any()))
        scen = sorted(set(f["scenario"].astype(str)) | set(scenarios or []))
        emb = table.item_embeddings
        seq_len = table.sequences.shape[1] if table.sequences is not None and table.sequences.ndim == 2 else 0
        return cls(tasks=list(table.tasks), user_categorical=list(table.user_categorical),
                   user_numeric=list(table.user_numeric), item_categorical=list(table.item_categorical),
                   item_numeric=list(table.item_numeric), vocabs=vocabs, scenarios=scen, numeric=numeric,
                   id_buckets=id_buckets, text_dim=emb.dim if emb is not None else 0, sequence_length=seq_len)

    # -- sizes the model needs -------------------------------------------------------------------------
    def cardinality(self, column: str) -> int:
        if column in ("user_id", "item_id") and self.id_buckets > 0:
            return self.id_buckets + 2
        return len(self.vocabs.get(column, [])) + 2

    @property
    def n_scenarios(self) -> int:
        return len(self.scenarios) + 2

    def numeric_width(self, side: str) -> int:
        cols = self.user_numeric if side == "user" else self.item_numeric
        return len(cols) + sum(self.numeric[c].has_missing for c in cols)

    # -- transforming ----------------------------------------------------------------------------------
    def ids(self, column: str, values: Any) -> np.ndarray:
        if column in ("user_id", "item_id"):
            return _lookup([], values, self.id_buckets) if self.id_buckets > 0 else \
                _lookup(self._index.get(column, pd.Index([])), values)
        return _lookup_few(self._index.get(column, pd.Index([])), values)

    def scenario_index(self, values: Any) -> np.ndarray:
        return _lookup_few(pd.Index(self.scenarios), values)

    def _numeric(self, f: pd.DataFrame, cols: list[str]) -> np.ndarray:
        out = []
        for c in cols:
            st = self.numeric[c]
            x = pd.to_numeric(f[c], errors="coerce").to_numpy(np.float64) if c in f.columns else np.full(len(f), np.nan)
            ok = np.isfinite(x)
            if st.log:
                x = np.log1p(np.clip(x, 0, None))
            z = np.clip((x - st.mean) / st.std, -CLIP, CLIP)
            out.append(np.where(ok, z, 0.0))
            if st.has_missing:
                out.append((~ok).astype(np.float64))
        return np.stack(out, axis=1).astype(np.float32) if out else np.zeros((len(f), 0), np.float32)

    def _cats(self, f: pd.DataFrame, cols: list[str]) -> np.ndarray:
        if not cols:
            return np.zeros((len(f), 0), np.int64)
        return np.stack([self.ids(c, f[c].to_numpy(dtype=object) if c in f.columns else np.full(len(f), None))
                         for c in cols], axis=1)

    def text_table(self, table) -> tuple[torch.Tensor, np.ndarray]:
        """(matrix [n_items + 1, text_dim] with a zero last row, per-item-id index into it)."""
        emb = table.item_embeddings
        if self.text_dim == 0 or emb is None or emb.dim != self.text_dim:
            return torch.zeros((1, max(self.text_dim, 1))), np.array([])
        mat = np.concatenate([emb.vectors.astype(np.float32), np.zeros((1, emb.dim), np.float32)])
        return torch.from_numpy(mat), np.array(emb.item_ids, dtype=object)

    def transform(self, table, *, labels: bool = True,
                  sides: tuple[str, ...] = ("user", "item")) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Tensors for every row (ids int32 to halve memory; converted per batch) and the text matrix. `sides`:
        only the user or only the item inputs (scoring encodes users and items apart; "scenario" is always there)."""
        f = table.frame
        if table.item_embeddings is not None and self.text_dim and table.item_embeddings.dim != self.text_dim:
            raise ModelError(f"text embeddings have {table.item_embeddings.dim} dims, the model expects "
                             f"{self.text_dim}: was the text encoder changed without retraining?", table="item_embeddings")
        text, _ = self.text_table(table)
        n_text = text.shape[0] - 1

        def text_idx(item_ids: np.ndarray) -> np.ndarray:
            if table.item_embeddings is None or n_text == 0:
                return np.full(item_ids.shape, n_text, np.int64)
            pos = table.item_embeddings.index_of(pd.Series(item_ids.ravel())).reshape(item_ids.shape)
            return np.where(pos >= 0, pos, n_text)

        out = {"scenario": self.scenario_index(f["scenario"].astype(str).to_numpy(dtype=object))}
        if "user" in sides:
            out.update(user=self.ids("user_id", f["user_id"].to_numpy(dtype=object)),
                       user_cat=self._cats(f, self.user_categorical), user_num=self._numeric(f, self.user_numeric))
        if "item" in sides:
            items = f["item_id"].to_numpy(dtype=object)
            out.update(item=self.ids("item_id", items), item_cat=self._cats(f, self.item_categorical),
                       item_num=self._numeric(f, self.item_numeric), text=text_idx(items))
        L = self.sequence_length if "user" in sides else 0
        if L:
            seq = table.sequences
            if isinstance(seq, CodedSequences):  # look the (few) distinct items up once, then index by code
                codes = seq.codes[:, :L]
                if codes.shape[1] < L:
                    codes = np.concatenate([codes, np.full((len(f), L - codes.shape[1]), -1, codes.dtype)], axis=1)
                vocab = seq.items
                ids = self.ids("item_id", vocab)
                ids[(vocab == "") | pd.isna(vocab)] = PAD
                out["seq"] = ids[codes]
                out["seq_text"] = text_idx(vocab)[codes]
            else:
                seq = seq if seq is not None else np.full((len(f), L), "", dtype=object)
                seq = seq[:, :L]
                if seq.shape[1] < L:
                    seq = np.concatenate([seq, np.full((len(f), L - seq.shape[1]), "", dtype=object)], axis=1)
                ids = self.ids("item_id", seq.ravel()).reshape(seq.shape)
                ids[(seq == "") | pd.isna(seq)] = PAD
                out["seq"] = ids
                out["seq_text"] = text_idx(seq)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
        for k in ("user", "item", "scenario", "user_cat", "item_cat", "text", "seq", "seq_text"):
            if k in tensors:
                tensors[k] = tensors[k].to(torch.int32)
        if labels and all(t in f.columns for t in self.tasks):
            y = np.stack([pd.to_numeric(f[t], errors="coerce").to_numpy(np.float32) for t in self.tasks], axis=1)
            tensors["labels"] = torch.from_numpy(y)
        return tensors, text

    # -- serialisation ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "user_categorical": self.user_categorical, "user_numeric": self.user_numeric,
                "item_categorical": self.item_categorical, "item_numeric": self.item_numeric,
                "scenarios": self.scenarios, "id_buckets": self.id_buckets, "text_dim": self.text_dim,
                "sequence_length": self.sequence_length,
                "numeric": {k: vars(v) for k, v in self.numeric.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any], vocabs: dict[str, list[str]]) -> FeatureEncoder:
        return cls(tasks=d["tasks"], user_categorical=d["user_categorical"], user_numeric=d["user_numeric"],
                   item_categorical=d["item_categorical"], item_numeric=d["item_numeric"], vocabs=vocabs,
                   scenarios=d["scenarios"], numeric={k: NumericStats(**v) for k, v in d["numeric"].items()},
                   id_buckets=d["id_buckets"], text_dim=d["text_dim"], sequence_length=d["sequence_length"])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        out[k] = v.long() if v.dtype == torch.int32 else v
    return out
