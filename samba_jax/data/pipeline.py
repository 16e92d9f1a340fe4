"""The grain input pipeline for pretraining and evaluation.

    per source (one, or each component of a "mix:" source):
      documents (MapDataset, sources.py)
      -> shuffle(seed)              one global permutation of documents
      -> repeat()                   reshuffled every epoch (grain folds the epoch
                                    into the shuffle seed)
      -> [process_index::process_count]   this JAX process's documents
      -> filter(non-empty) + map(tokenize + EOS)   int32 (doc_len,) per document;
                                    "array_record" documents are already tokenized
      -> to_iter_dataset(ReadOptions)
      -> pack_documents(seq_len + 1)      back to back, no resets, tail dropped
    -> IterDataset.mix(weights)     "mix:" only: rows interleaved in the weight
                                    proportions (deterministic, no randomness), so
                                    weights are fractions of tokens; component k
                                    shuffles with seed + k
      -> batch(batch_size, drop_remainder=True)
      -> {"tokens": (batch_size, seq_len + 1) int32}
      -> mp_prefetch(worker_count)  only when worker_count > 0
      -> limit(max_batches)         only when max_batches is set

Tokenization runs as a MapDataset map (before `to_iter_dataset`) so grain's
prefetch threads do it ahead of the training step; the result is the same as
tokenizing after `to_iter_dataset`, which is where MaxText puts it.

`batch_size` is per process. A row has `seq_len + 1` tokens so that
inputs = tokens[:, :-1] and targets = tokens[:, 1:] both have `seq_len`.

The iterator of the returned dataset is a `grain.DatasetIterator`: its
`get_state()` is a small JSON-serializable dict and
`grain.checkpoint.CheckpointSave/CheckpointRestore` (orbax) work on it. Restore
into an iterator built with the same arguments (and the same process count and
worker count); the batches after a restore equal the uninterrupted ones.

A mixture ends (repeat=False) when its first component runs out.
"""

from __future__ import annotations

import grain
import jax
import numpy as np
from absl import flags

from samba_jax.data import holdout, packing, sources
from samba_jax.data import tokenizer as tokenizer_lib


class TokenizeWithEos:
    """Maps a document string to `(doc_len,)` int32 ids followed by EOS."""

    def __init__(self, tokenizer: tokenizer_lib.Tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text)
        ids.append(self._tokenizer.eos_id)
        return np.asarray(ids, dtype=np.int32)


def _as_int32(tokens: np.ndarray) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


def _is_nonempty(text: str) -> bool:
    return bool(text.strip())


def _as_batch_dict(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": rows}


def make_dataset(
    source: str,
    tokenizer: tokenizer_lib.Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    split: str = "train",
    *,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    jsonl_field: str = "text",
    tfds_data_dir: str | None = None,
    tfds_text_feature: str = "text",
    max_batches: int | None = None,
    holdout_permille: int = 0,
) -> grain.IterDataset:
    """Builds the packed-token dataset of one JAX process.

    Args:
        source: "stdlib", "text:<glob>", "jsonl:<glob>", "array_record:<dir>",
            "tfds:<name>[/<config>][:<split>]" or "mix:<w>*<spec>,..." (see sources.py).
        tokenizer: Encodes documents; its `eos_id` ends every document.
        seq_len: Model sequence length; rows have `seq_len + 1` tokens.
        batch_size: Rows per batch on this process (global batch / process count).
        seed: Document shuffle seed, in [0, 2**32).
        split: "train" or "validation" (used by the "stdlib" source).
        shuffle: Shuffle documents (reshuffled each epoch when repeating).
        repeat: Repeat forever (training). False gives one pass over this
            process's documents (evaluation); it stops when they run out.
        process_index: This process's index; defaults to `jax.process_index()`.
        process_count: Number of processes; defaults to `jax.process_count()`.
        worker_count: Grain worker processes (0: tokenize in this process). Output
            is deterministic for a given count but changes with it, because each
            worker packs its own slice of the documents.
        read_threads: Prefetch threads that read and tokenize documents. They
            overlap tokenization with the train step; SentencePiece holds the GIL,
            so more threads do not tokenize faster (worker_count does).
        jsonl_field: Text field of "jsonl:" records.
        tfds_data_dir: TFDS data_dir of "tfds:" sources (None: TFDS's default).
        tfds_text_feature: Text feature of "tfds:" examples.
        max_batches: Stop after this many batches (evaluation). In a multi-process
            evaluation, choose it at most the smallest per-process batch count (or
            use repeat=True with shuffle=False), so that all processes take the same
            number of steps.
        holdout_permille: If positive, sources other than "stdlib" are split by
            data/holdout.py: "validation" is this many documents per 1000, "train"
            the rest (for a run whose source has no validation of its own).

    Returns:
        A `grain.IterDataset` whose elements are
        `{"tokens": np.ndarray (batch_size, seq_len + 1) int32}`.
    """
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive: {seq_len=}, {batch_size=}.")
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"Bad process {process_index=} of {process_count=}.")

    components = sources.parse_mixture(source)
    rows = []
    for k, (_, spec) in enumerate(components):
        documents = sources.make_document_source(
            spec, split, jsonl_field, tfds_data_dir=tfds_data_dir,
            tfds_text_feature=tfds_text_feature)
        if getattr(documents, "tokenized", False):
            _check_documents(spec, documents, tokenizer)
        if holdout_permille and spec != "stdlib":
            documents = holdout.HeldOutSplit(documents, split, holdout_permille)
            if len(documents) == 0:
                raise ValueError(f"Data source {spec!r} has one document, too few to hold any out for validation."
                                 " Fix: set config.data.eval_source, or data.holdout_permille=0 for no validation.")
        ds = grain.MapDataset.source(documents)
        if shuffle:
            # Distinct seeds keep equal-sized components from sharing a permutation.
            ds = ds.shuffle(seed=(seed + k) % 2**32)
        if repeat:
            ds = ds.repeat()
        # Sharding after shuffle+repeat: processes take interleaved documents of one
        # global order, so within an epoch their documents are disjoint.
        ds = ds[process_index::process_count]
        if getattr(documents, "tokenized", False):
            ds = ds.map(_as_int32)
        else:
            ds = ds.filter(_is_nonempty).map(TokenizeWithEos(tokenizer))
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
        rows.append(packing.pack_documents(ds, seq_len + 1))
    if len(rows) == 1:
        ds = rows[0]
    else:
        ds = grain.IterDataset.mix(rows, [w for w, _ in components])
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_as_batch_dict)
    if worker_count > 0:
        # Grain's worker processes read absl flags; outside an absl app (tests,
        # notebooks) nobody parsed them, so fall back to the flag defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    if max_batches is not None:
        ds = grain.experimental.LimitIterDataset(ds, count=max_batches)
    return ds


def get_tokenizer(
    source: str,
    tokenizer_path: str | None,
    workdir: str,
    vocab_size: int = 4096,
) -> tokenizer_lib.Tokenizer:
    """The tokenizer a run should use.

    Args:
        source: The training data source spec.
        tokenizer_path: A SentencePiece `.model` file; empty/None means "the
            default stdlib tokenizer", which only the "stdlib" source may use.
        workdir: Run directory, where the default tokenizer is cached.
        vocab_size: Vocabulary of the default tokenizer (ignored with a path).

    Returns:
        The loaded `Tokenizer`.
    """
    if tokenizer_path:
        return tokenizer_lib.Tokenizer(tokenizer_path)
    if source == "stdlib":
        return tokenizer_lib.train_default_tokenizer(workdir, vocab_size)
    raise ValueError(
        f"Data source {source!r} needs a tokenizer: set the SentencePiece"
        " `.model` path (the default stdlib tokenizer is only trained for the"
        " 'stdlib' source)."
    )


def _check_documents(spec: str, documents: sources.TokenizedRecordsSource,
                     tokenizer: tokenizer_lib.Tokenizer) -> None:
    recorded = documents.manifest["tokenizer"]
    if recorded["sha256"] != tokenizer.sha256():
        manifest = f"{documents.directory.rstrip('/')}/{sources.MANIFEST_NAME}"
        raise ValueError(
            f"Data source {spec!r} was tokenized with another tokenizer: {manifest} records"
            f" {recorded['path']} (sha256 {recorded['sha256'][:12]}..., vocab"
            f" {recorded['vocab_size']}), but config.data.tokenizer is"
            f" {tokenizer.model_path!r} (sha256 {tokenizer.sha256()[:12]}...). Fix: set"
            f" --config.data.tokenizer={recorded['path']}, or re-run samba_jax.data.prepare"
            " with the tokenizer you want.")


def check_source(source: str, tokenizer: str | tokenizer_lib.Tokenizer) -> None:
    """Raises ValueError if an "array_record:" part of `source` used another tokenizer.

    Args:
        source: A source spec (mixtures are checked component by component).
        tokenizer: The tokenizer in use, or the path of its `.model` file. Identity
            is the SHA-256 of its serialized model proto, as prepare.py records it.
    """
    if isinstance(tokenizer, str):
        tokenizer = tokenizer_lib.Tokenizer(tokenizer)
    for _, spec in sources.parse_mixture(source):
        kind, _, directory = spec.partition(":")
        if kind == "array_record" and directory:
            _check_documents(spec, sources.TokenizedRecordsSource(directory), tokenizer)
