"""A deterministic held-out split of a document source that has none of its own.

Document i goes to validation when a hash of its index falls in the first `permille` of 1000
buckets (as the default corpus splits by name), to training otherwise; a source too small for any
bucket to hit gives validation its one lowest-hashed document (it needs two or more). So the two
splits never share a document, and the split is the same on every run and every host for the same
source listing (globs are expanded in sorted order).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def _hash(index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"doc-{index}".encode()).digest()[:8], "big")


def validation_indices(count: int, permille: int) -> np.ndarray:
    """Indices (sorted) of the held-out documents among `count`."""
    hashes = np.asarray([_hash(i) for i in range(count)], np.uint64)
    chosen = np.flatnonzero(hashes % np.uint64(1000) < permille)
    if chosen.size == 0 and count >= 2:
        chosen = np.asarray([int(np.argmin(hashes))])
    return chosen


class HeldOutSplit:
    """The documents of `documents` that belong to `split` ("train" or "validation")."""

    def __init__(self, documents: Sequence, split: str, permille: int):
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        if not 0 < permille < 1000:
            raise ValueError(f"data.holdout_permille must be in 1..999, got {permille}")
        self._documents = documents
        self.tokenized = getattr(documents, "tokenized", False)
        held = validation_indices(len(documents), permille)
        if split == "validation":
            self._indices = held
        else:
            keep = np.ones(len(documents), bool)
            keep[held] = False
            self._indices = np.flatnonzero(keep)

    @property
    def source(self):
        """The whole source (e.g. for its manifest)."""
        return self._documents

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self._documents[int(self._indices[index])]

    def __repr__(self) -> str:
        return f"HeldOutSplit({self._documents!r}, {len(self)} documents)"
