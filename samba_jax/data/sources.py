"""Document sources: random-access lists of documents for grain.

A source spec is one string:
  * "stdlib"                 the embedded standard-library corpus; the `split`
                             argument picks "train" or "validation".
  * "text:<glob>"            every matching file is one document (UTF-8).
  * "jsonl:<glob>"           every non-blank line of every matching file is one
                             JSON document; its text is the field `jsonl_field`.
  * "array_record:<dir>"     shards written by `python -m samba_jax.data.prepare`:
                             already tokenized (int32 ids, EOS last), listed in
                             `<dir>/manifest.json`. The tokenizer in use must be
                             the one the manifest names (`pipeline.check_source`).
  * "tfds:<name>[/<config>][:<split>]"   an already prepared TFDS dataset in
                             ArrayRecord format, read with `tfds.data_source`
                             (no TensorFlow needed); the text is the feature
                             `tfds_text_feature`; without ":<split>" the `split`
                             argument is used.
  * "mix:<w>*<spec>,<w>*<spec>,..."   a weighted mixture of the specs above,
                             e.g. "mix:0.7*jsonl:/a/*.jsonl,0.3*array_record:/b".
                             Weights are fractions of TOKENS (packed rows), need
                             not sum to 1, and the mixture is deterministic
                             (see pipeline.py). A "," only separates components
                             when a "<number>*" follows it, so globs may hold ",".

For file sources the glob *is* the split (point training and evaluation at
different globs); `split` is ignored. Globs are expanded with `recursive=True`
and sorted, so every process sees the same document order. Globs and files may
be any `etils.epath` location (e.g. "gs://bucket/*.jsonl").

Text is decoded as UTF-8 with invalid bytes replaced by U+FFFD; the text
sources count such documents, and empty (whitespace-only) documents, in their
`stats` dict and log a warning the first time each happens. The pipeline skips
empty documents. The counts are per process: grain worker processes count in
their own copies of the source.

Every source here has `__len__` and `__getitem__(i)`, reads files lazily and
pickles cheaply (paths and offsets only), so grain can read it from prefetch
threads and worker processes. Text sources return `str`; "array_record" returns
`(doc_len,)` int32 arrays and has `tokenized = True`.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence

import numpy as np
from etils import epath

from samba_jax.data import default_corpus
from samba_jax.data.text_decoding import CountingTextSource

MANIFEST_NAME = "manifest.json"


def _open_binary(path: str):
    # Plain open() for local files; epath (gcsfs/tf-free backends) for URLs.
    return epath.Path(path).open("rb") if "://" in path else open(path, "rb")


class TextFilesSource(CountingTextSource):
    """One document per file, read on access."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        self._init_stats()

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> str:
        path = self._paths[index]
        with _open_binary(path) as f:
            text = self._decode(f.read(), path)
        return self._count_if_empty(text, path)

    def __repr__(self) -> str:
        return f"TextFilesSource({len(self._paths)} files)"


def parse_jsonl_line(line: bytes, field: str, where: str, decode) -> str:
    """The text of one JSONL record; `decode(bytes) -> str`; errors name `where` and the field."""
    text = decode(line)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON line ({e}).") from None
    if not isinstance(record, dict) or field not in record:
        raise KeyError(f"{where}: JSONL record has no field {field!r} (set jsonl_field to"
                       " the text field's name).")
    return str(record[field])


class JsonlLinesSource(CountingTextSource):
    """One document per non-blank JSONL line; the text is `record[field]`.

    Construction scans the files once for line offsets (two int64 per line);
    documents are read and parsed on access.
    """

    def __init__(self, paths: Sequence[str], field: str = "text"):
        self._paths = list(paths)
        self._field = field
        self._init_stats()
        file_ids, starts, lengths = [], [], []
        for file_id, path in enumerate(self._paths):
            offset = 0
            with _open_binary(path) as f:
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
        with _open_binary(path) as f:
            f.seek(int(self._starts[index]))
            line = f.read(int(self._lengths[index]))
        where = f"{path}: byte {int(self._starts[index])}"
        text = parse_jsonl_line(line, self._field, where, lambda b: self._decode(b, where))
        return self._count_if_empty(text, where)

    def __repr__(self) -> str:
        return (f"JsonlLinesSource({len(self._paths)} files, {len(self)} lines,"
                f" field={self._field!r})")


def read_manifest(directory: str) -> dict:
    path = epath.Path(directory) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: 'array_record:{directory}' must be a directory written by"
            f" `python -m samba_jax.data.prepare --output={directory}` (run it to completion;"
            " the manifest is written last).")
    return json.loads(path.read_text())


class TokenizedRecordsSource:
    """Prepared ArrayRecord shards; element i is `(doc_len,)` int32 ids, EOS last."""

    tokenized = True

    def __init__(self, directory: str):
        import grain  # Deferred: the prepare CLI imports this module without grain.

        self.directory = directory
        self.manifest = read_manifest(directory)
        paths = [os.fspath(epath.Path(directory) / s["file"]) for s in self.manifest["shards"]]
        self._records = grain.sources.ArrayRecordDataSource(paths) if paths else []

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> np.ndarray:
        # Records are raw little-endian int32 (never pickle); "<i4" is int32 here.
        return np.frombuffer(self._records[index], dtype="<i4")

    def __repr__(self) -> str:
        return f"TokenizedRecordsSource({self.directory!r}, {len(self)} documents)"


def expand_glob(pattern: str, spec: str) -> list[str]:
    """Sorted files matching `pattern` (local or an epath URL); error if none."""
    if "://" in pattern:
        # epath globs relative to the longest wildcard-free folder.
        parts = pattern.split("/")
        fixed = next(i for i, p in enumerate(parts + ["*"]) if any(c in p for c in "*?["))
        root = "/".join(parts[:fixed])
        paths = sorted(os.fspath(p) for p in epath.Path(root).glob("/".join(parts[fixed:]))
                       if p.is_file())
    else:
        paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                       if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"Data source {spec!r}: the glob {pattern!r} matches no files.")
    return paths


_MIX_SEPARATOR = re.compile(r",(?=\s*[0-9.eE+-]+\s*\*)")


def parse_mixture(source: str) -> list[tuple[float, str]]:
    """[(weight, component spec)]: one (1.0, source) unless source is "mix:...". """
    if not source.startswith("mix:"):
        return [(1.0, source)]
    components = []
    for item in _MIX_SEPARATOR.split(source[len("mix:"):]):
        weight, star, spec = item.partition("*")
        try:
            weight = float(weight)
        except ValueError:
            weight = -1.0
        if not star or weight <= 0 or not spec or spec.startswith("mix:"):
            raise ValueError(f"Bad mixture component {item!r} in {source!r}; expected"
                             " 'mix:<weight>*<source>,<weight>*<source>,...' with positive"
                             " weights, e.g. 'mix:0.7*jsonl:/a/*.jsonl,0.3*array_record:/b'.")
        components.append((weight, spec.strip()))
    return components


def make_document_source(source: str, split: str = "train", jsonl_field: str = "text", *,
                         tfds_data_dir: str | None = None,
                         tfds_text_feature: str = "text") -> Sequence:
    """Returns the random-access document list for one (non-mixture) source spec.

    Args:
        source: "stdlib", "text:<glob>", "jsonl:<glob>", "array_record:<dir>" or
            "tfds:<name>[/<config>][:<split>]".
        split: "train" or "validation"; used by "stdlib" and split-less "tfds:".
        jsonl_field: The JSON field holding the text, for "jsonl:" sources.
        tfds_data_dir: TFDS data_dir ("" or None: TFDS's default).
        tfds_text_feature: The TFDS feature holding the text.

    Returns:
        A sequence of documents (str, or int32 arrays when `.tokenized`).
    """
    kind, _, rest = source.partition(":")
    if source == "stdlib":
        documents = default_corpus.load_documents(split)
    elif kind == "text" and rest:
        documents = TextFilesSource(expand_glob(rest, source))
    elif kind == "jsonl" and rest:
        documents = JsonlLinesSource(expand_glob(rest, source), jsonl_field)
    elif kind == "array_record" and rest:
        documents = TokenizedRecordsSource(rest)
    elif kind == "tfds" and rest:
        name, _, tfds_split = rest.partition(":")
        from samba_jax.data import tfds_source  # Deferred: imports tensorflow_datasets.

        documents = tfds_source.TfdsTextSource(name, tfds_split or split, tfds_data_dir,
                                               tfds_text_feature)
    else:
        raise ValueError(
            f"Unknown data source {source!r}; expected 'stdlib', 'text:<glob>', 'jsonl:<glob>',"
            " 'array_record:<dir>', 'tfds:<name>[/<config>][:<split>]' or 'mix:...'.")
    if len(documents) == 0:  # pylint: disable=g-explicit-length-test
        raise ValueError(f"Data source {source!r} ({split=}) has no documents.")
    return documents
