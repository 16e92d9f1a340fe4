"""The embedded offline corpus: the running Python's own standard library.

Every install of Python carries a few tens of MB of English prose and code: the
`pydoc_data.topics` help texts and the `.py` sources of the standard library.
That is enough to train a small tokenizer and smoke-test pretraining with no
network and no download.

Documents:
  * one per pydoc topic, named `pydoc/<topic>`;
  * one per stdlib `.py` file, named `stdlib/<path relative to the stdlib dir>`,
    skipping `site-packages`, `dist-packages`, `test`/`tests` folders,
    `idlelib`, and files that are not valid UTF-8.

Split: a document goes to "validation" when a stable hash (SHA-256) of its name
falls in the lowest `VALIDATION_PERMILLE`/1000 of the hash range. The split is
therefore identical across runs, processes and machines with the same Python,
and a document never moves between splits when others are added or removed.

The corpus depends on the Python version that runs it; two machines with
different Pythons see slightly different corpora.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pydoc_data.topics
import sysconfig
from typing import NamedTuple

SPLITS = ("train", "validation")
VALIDATION_PERMILLE = 50  # ~5% of documents go to validation.

# Folder names skipped anywhere under the stdlib directory: third-party code,
# the regression test suite (huge, repetitive fixtures) and the IDLE app.
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
)


class Document(NamedTuple):
    """One corpus document: a stable `name` and its `text`."""

    name: str
    text: str


def split_of(name: str) -> str:
    """Returns "train" or "validation" for a document name (stable hash)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 1000
    return "validation" if bucket < VALIDATION_PERMILLE else "train"


def stdlib_dir() -> str:
    """The directory the corpus reads `.py` files from."""
    return sysconfig.get_paths()["stdlib"]


def _pydoc_documents() -> list[Document]:
    return [
        Document(f"pydoc/{topic}", text)
        for topic, text in pydoc_data.topics.topics.items()
        if text.strip()
    ]


def _stdlib_source_documents(root: str) -> list[Document]:
    documents = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into skipped folders.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for filename in filenames:
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip():
                continue  # Many `__init__.py` files are empty.
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            documents.append(Document(f"stdlib/{relative}", text))
    return documents


@functools.cache
def _documents_by_split() -> dict[str, tuple[Document, ...]]:
    documents = _pydoc_documents() + _stdlib_source_documents(stdlib_dir())
    # Sorting by name makes the order independent of os.walk and dict order.
    documents.sort(key=lambda d: d.name)
    by_split = {split: [] for split in SPLITS}
    for document in documents:
        by_split[split_of(document.name)].append(document)
    return {split: tuple(docs) for split, docs in by_split.items()}


def load_named_documents(split: str) -> list[Document]:
    """Returns the documents of one split, sorted by name.

    Args:
        split: "train" or "validation".

    Returns:
        A new list of `Document(name, text)`; the texts are shared with an
        in-process cache, so repeated calls are cheap.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    return list(_documents_by_split()[split])


def load_documents(split: str) -> list[str]:
    """Returns the texts of one split ("train" or "validation"), sorted by name."""
    return [document.text for document in load_named_documents(split)]
