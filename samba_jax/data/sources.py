"""Document sources: random-access lists of text documents for grain.

A source spec is one string:
  * "stdlib"                 the embedded standard-library corpus; the `split`
                             argument picks "train" or "validation".
  * "text:<glob>"            every matching file is one document (UTF-8).
  * "jsonl:<glob>"           every non-blank line of every matching file is one
                             JSON document; its text is the field `jsonl_field`.

For file sources the glob *is* the split (point training and evaluation at
different globs); `split` is ignored. Globs are expanded with `recursive=True`
and sorted, so every process sees the same document order.

Every source here has `__len__` and `__getitem__(i) -> str`, reads files lazily
and pickles cheaply (paths and offsets only), so grain can read it from
prefetch threads and worker processes.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import numpy as np

from samba_jax.data import default_corpus


class TextFilesSource:
    """One document per file, read on access."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> str:
        # errors="replace": one stray byte should not kill a long training run.
        with open(self._paths[index], encoding="utf-8", errors="replace") as f:
            return f.read()

    def __repr__(self) -> str:
        return f"TextFilesSource({len(self._paths)} files)"


class JsonlLinesSource:
    """One document per non-blank JSONL line; the text is `record[field]`.

    Construction scans the files once for line offsets (two int64 per line);
    documents are read and parsed on access.
    """

    def __init__(self, paths: Sequence[str], field: str = "text"):
        self._paths = list(paths)
        self._field = field
        file_ids, starts, lengths = [], [], []
        for file_id, path in enumerate(self._paths):
            offset = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        file_ids.append(file_id)
                        starts.append(offset)
                        lengths.append(len(line))
                    offset += len(line)
        self._file_ids = np.asarray(file_ids, dtype=np.int32)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> str:
        path = self._paths[self._file_ids[index]]
        with open(path, "rb") as f:
            f.seek(int(self._starts[index]))
            line = f.read(int(self._lengths[index]))
        record = json.loads(line.decode("utf-8", errors="replace"))
        if not isinstance(record, dict) or self._field not in record:
            raise KeyError(
                f"{path}: JSONL record at byte {int(self._starts[index])} has no"
                f" field {self._field!r} (set jsonl_field to the text field's name)."
            )
        return str(record[self._field])

    def __repr__(self) -> str:
        return (f"JsonlLinesSource({len(self._paths)} files, {len(self)} lines,"
                f" field={self._field!r})")


def _expand_glob(pattern: str, spec: str) -> list[str]:
    paths = sorted(
        p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
        if os.path.isfile(p)
    )
    if not paths:
        raise FileNotFoundError(
            f"Data source {spec!r}: the glob {pattern!r} matches no files."
        )
    return paths


def make_document_source(
    source: str, split: str = "train", jsonl_field: str = "text"
) -> Sequence[str]:
    """Returns the random-access document list for a source spec.

    Args:
        source: "stdlib", "text:<glob>" or "jsonl:<glob>".
        split: "train" or "validation"; used by "stdlib" only.
        jsonl_field: The JSON field holding the text, for "jsonl:" sources.

    Returns:
        A sequence of documents (str); len() is the number of documents.
    """
    kind, _, pattern = source.partition(":")
    if source == "stdlib":
        documents = default_corpus.load_documents(split)
    elif kind == "text" and pattern:
        documents = TextFilesSource(_expand_glob(pattern, source))
    elif kind == "jsonl" and pattern:
        documents = JsonlLinesSource(_expand_glob(pattern, source), jsonl_field)
    else:
        raise ValueError(
            f"Unknown data source {source!r}; expected 'stdlib',"
            " 'text:<glob>' or 'jsonl:<glob>'."
        )
    if len(documents) == 0:  # pylint: disable=g-explicit-length-test
        raise ValueError(f"Data source {source!r} ({split=}) has no documents.")
    return documents
