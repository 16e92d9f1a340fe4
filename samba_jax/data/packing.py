"""Concatenate-then-split packing of token documents into fixed-length rows.

The documents of the parent stream are laid back to back and cut every
`row_length` tokens; a document that does not fit continues at the start of the
next row. Nothing is padded, no attention reset is marked, and when the parent
runs out the incomplete last row is dropped.

    docs:  [a a a] [b b b b b] [c c]      row_length=4
    rows:  [a a a b] [b b b b]            ([c c] is dropped at the end)

Why not grain's `ConcatThenSplitIterDataset`: it pads the last row instead of
dropping it, adds segment-id/position features we do not use, and its state
keeps a tuple sentinel `(-1, -1)` that comes back as a list after the JSON round
trip that `grain.checkpoint` and orbax perform, after which a restored iterator
skips part of the stream (grain 0.2.18).

State: the parent's state just before the document the next row starts in,
plus the offset into that document. Restoring re-reads (re-tokenizes) only that
one document, however long the stream has run.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np


class _PackedRowsIterator(grain.DatasetIterator):
    """Yields `(row_length,)` rows cut from the concatenated parent documents."""

    def __init__(self, parent: grain.DatasetIterator, row_length: int):
        super().__init__(parent)
        self._row_length = row_length
        self._document: np.ndarray | None = None  # (doc_len,) tokens in progress.
        self._document_parent_state: dict[str, Any] | None = None
        self._offset = 0  # Tokens of `_document` already emitted.

    def _has_partial_document(self) -> bool:
        return self._document is not None and self._offset < len(self._document)

    def __next__(self) -> np.ndarray:
        pieces = []
        missing = self._row_length
        while missing:
            if not self._has_partial_document():
                # Copied because some parent iterators may mutate their state object.
                self._document_parent_state = copy.deepcopy(self._parent.get_state())
                # StopIteration propagates here: the partial row is the dropped tail.
                self._document = np.asarray(next(self._parent))
                self._offset = 0
            take = min(missing, len(self._document) - self._offset)
            pieces.append(self._document[self._offset : self._offset + take])
            self._offset += take
            missing -= take
        return np.concatenate(pieces)

    def get_state(self) -> dict[str, Any]:
        if self._has_partial_document():
            return {"parent": copy.deepcopy(self._document_parent_state), "offset": self._offset}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._document = None
        self._offset = 0
        if state["offset"]:
            self._document_parent_state = copy.deepcopy(state["parent"])
            self._document = np.asarray(next(self._parent))
            self._offset = int(state["offset"])


class PackedRowsIterDataset(grain.IterDataset):
    """Packs a stream of 1-D token arrays into rows of exactly `row_length`.

    Parent elements: `(doc_len,)` integer arrays, doc_len >= 1 (EOS included).
    Elements: `(row_length,)` arrays of the parent's dtype.
    """

    def __init__(self, parent: grain.IterDataset, row_length: int):
        super().__init__(parent)
        if row_length <= 0:
            raise ValueError(f"row_length must be positive, got {row_length}.")
        self._row_length = row_length

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self._row_length)

    def __str__(self) -> str:
        return f"PackedRowsIterDataset(row_length={self._row_length})"


def pack_documents(ds: grain.IterDataset, row_length: int) -> grain.IterDataset:
    """Concatenates the token documents of `ds` and splits them into rows."""
    return PackedRowsIterDataset(ds, row_length)
