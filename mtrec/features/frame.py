"""The hand-off between the features stage and the model: rows with features as of the serving cut-off."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

KEY_COLUMNS = ("user_id", "item_id", "scenario")


def distinct_index(ids) -> pd.Index:
    """The ids once each, in first-seen order, as an Index; an Index of distinct ids is returned as it is (its
    lookups' hash table, built once, is then shared by every holder)."""
    return ids if isinstance(ids, pd.Index) and ids.is_unique else pd.Index(list(dict.fromkeys(ids)))


@dataclass
class ItemEmbeddings:
    """Text embeddings kept as one matrix keyed by item (never joined onto every row)."""

    item_ids: list[str]
    vectors: np.ndarray  # float32 [n_items, dim]
    missing: np.ndarray  # bool [n_items]: title empty or absent (vector is zeros)
    encoder_id: str = ""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def index_of(self, item_ids: pd.Series | list[str]) -> np.ndarray:
        """Row index per item id; -1 for items without an embedding."""
        lookup = pd.Index(self.item_ids)
        return lookup.get_indexer(pd.Index(item_ids)).astype(np.int64)


@dataclass
class CodedSequences:
    """Behaviour sequences as codes into a small vocabulary (many users share few items): `codes` [N, L] int
    (-1 pads) and `items`, the item id of each code followed by "" (so `items[codes]` decodes, pads included)."""

    codes: np.ndarray
    items: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    def __getitem__(self, rows) -> CodedSequences:
        return CodedSequences(self.codes[rows], self.items)

    def decode(self) -> np.ndarray:
        """The object array of item ids ("" pads) that `FeatureTable.sequences` holds otherwise."""
        return self.items[self.codes]


@dataclass
class FeatureTable:
    """Impressions (training, holdout) or (user, scenario, item) pairs (scoring) with their features.

    `frame` holds one row per impression/pair: user_id, item_id, scenario, ds (the row's day),
    feature_time (the UTC instant the features are as of: 00:00 of ds for impressions, the end of ds
    for scoring), one 0/1 column per task when labelled, and the feature columns named in the lists.
    User-side columns depend on (user, scenario) only and item-side columns on (item, scenario) only, so
    scoring can compute each side once and reuse it across pairs.
    """

    frame: pd.DataFrame
    tasks: list[str]
    user_categorical: list[str] = field(default_factory=list)
    user_numeric: list[str] = field(default_factory=list)
    item_categorical: list[str] = field(default_factory=list)
    item_numeric: list[str] = field(default_factory=list)
    # [N, L] object array of item ids the user engaged with before feature_time, most recent first; "" pads
    # (or the same as codes, scoring's compact form)
    sequences: np.ndarray | CodedSequences | None = None
    item_embeddings: ItemEmbeddings | None = None
    feature_service: str = "mtrec_ranker_v1"

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def labelled(self) -> bool:
        return all(t in self.frame.columns for t in self.tasks)

    def subset(self, mask: np.ndarray | pd.Series) -> FeatureTable:
        mask = np.asarray(mask)
        return FeatureTable(
            frame=self.frame.loc[mask].reset_index(drop=True), tasks=self.tasks,
            user_categorical=self.user_categorical, user_numeric=self.user_numeric,
            item_categorical=self.item_categorical, item_numeric=self.item_numeric,
            sequences=None if self.sequences is None else self.sequences[mask],
            item_embeddings=self.item_embeddings, feature_service=self.feature_service)
