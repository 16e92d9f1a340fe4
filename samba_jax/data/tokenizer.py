"""SentencePiece tokenizer: a thin wrapper, and the default stdlib-trained model.

`Tokenizer` loads a `.model` file and exposes what the pipeline and the
sampler need: `encode` (no BOS, no EOS), `decode`, `vocab_size`, `eos_id`,
`pad_id`.

`train_default_tokenizer` trains a byte-fallback BPE model on the TRAIN split of
the embedded standard-library corpus (`default_corpus.py`) the first time it is
asked for, and caches it as `<workdir>/tokenizer/stdlib_sp<vocab>.model`.
Training is offline, deterministic (fixed options, one thread, no sampling) and
takes a few seconds for vocabularies up to 8192.

Special ids of the default model: pad=0, eos=1, unk=2, no BOS. Byte fallback
means any UTF-8 text encodes without <unk>. The normalizer is the identity and
whitespace is kept verbatim, so `decode(encode(text)) == text` for code too.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence

import sentencepiece as spm

from samba_jax.data import default_corpus

DEFAULT_PAD_ID = 0
DEFAULT_EOS_ID = 1
DEFAULT_UNK_ID = 2
# Above the ~11M characters of the stdlib corpus, so by default all of it is used.
DEFAULT_MAX_TRAINING_CHARS = 50_000_000


class Tokenizer:
    """A SentencePiece model.

    Attributes:
        model_path: The `.model` file it was loaded from.
        vocab_size: Number of pieces, i.e. the embedding rows the model needs.
        eos_id: Id appended after every document by the data pipeline.
        pad_id: Id reserved for padding (-1 when the model has none).
    """

    def __init__(self, model_path: str):
        if not os.path.exists(model_path):
            raise FileNotFoundError(
                f"SentencePiece model not found: {model_path!r}. Pass the path of an"
                " existing `.model` file, or leave the tokenizer path empty with"
                " source 'stdlib' to train the default tokenizer into the workdir"
                " (samba_jax.data.tokenizer.train_default_tokenizer)."
            )
        with open(model_path, "rb") as f:
            self._init_from_proto(f.read())
        self.model_path = model_path

    def _init_from_proto(self, model_proto: bytes) -> None:
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._processor.get_piece_size()
        self.eos_id = self._processor.eos_id()
        self.pad_id = self._processor.pad_id()
        if self.eos_id < 0:
            raise ValueError("The SentencePiece model has no EOS id; documents need one.")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self._processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    def serialized_proto(self) -> bytes:
        return self._processor.serialized_model_proto()

    def sha256(self) -> str:
        """Hex SHA-256 of `serialized_proto()`: the identity prepared data records."""
        return hashlib.sha256(self.serialized_proto()).hexdigest()

    # Grain worker processes receive the pipeline by pickling; ship the model bytes
    # rather than a path that may not exist on the worker's filesystem view.
    def __getstate__(self):
        return {"model_proto": self.serialized_proto(), "model_path": self.model_path}

    def __setstate__(self, state):
        self._init_from_proto(state["model_proto"])
        self.model_path = state["model_path"]

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def default_tokenizer_path(workdir: str, vocab_size: int) -> str:
    return os.path.join(workdir, "tokenizer", f"stdlib_sp{vocab_size}.model")


def _training_lines(max_chars: int) -> Iterator[str]:
    """Non-blank lines of the corpus TRAIN split, at most `max_chars` in total.

    SentencePiece trains on lines. Taking whole documents in name order until the
    budget is reached keeps the selection deterministic and independent of the
    trainer's own random sampling.
    """
    used = 0
    for text in default_corpus.load_documents("train"):
        for line in text.split("\n"):
            if not line.strip():
                continue
            if used + len(line) > max_chars:
                return
            used += len(line)
            yield line


def train_sentencepiece(
    lines: Iterator[str], vocab_size: int, *, num_threads: int = 1
) -> bytes:
    """Trains the default-style BPE model on `lines`; returns the model bytes.

    Args:
        lines: Training sentences (one line of text each, without "\\n").
        vocab_size: Number of pieces, including 3 specials and 256 byte pieces.
        num_threads: Trainer threads. The learned model depends on this number, so
            it is fixed (not the machine's core count) to keep models reproducible.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        vocab_size=vocab_size,
        # BPE trains in seconds here; unigram takes ~30 s for a similar vocab.
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9999,
        # Keep text verbatim: no NFKC, no whitespace squashing, no dummy "▁"
        # prefix, so decode(encode(x)) == x and indentation survives.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        # Lines are the training unit, so newline and tab never appear inside
        # them; making them symbols gives them one id each instead of a byte.
        user_defined_symbols=["\n", "\t"],
        max_sentence_length=1 << 14,
        input_sentence_size=0,  # Use every line given; the caller caps the input.
        pad_id=DEFAULT_PAD_ID,
        eos_id=DEFAULT_EOS_ID,
        unk_id=DEFAULT_UNK_ID,
        bos_id=-1,
        num_threads=num_threads,
        minloglevel=2,
    )
    return model.getvalue()


def train_default_tokenizer(
    workdir: str,
    vocab_size: int = 4096,
    *,
    max_training_chars: int = DEFAULT_MAX_TRAINING_CHARS,
) -> Tokenizer:
    """Returns the stdlib tokenizer cached in `workdir`, training it if absent.

    Args:
        workdir: Run directory; the model goes to
            `<workdir>/tokenizer/stdlib_sp<vocab_size>.model`.
        vocab_size: Number of pieces (at least ~400: 256 bytes + specials + chars).
        max_training_chars: Cap on training text, in characters (tests use a small
            one). Changing it changes the model, but not the cache file name: delete
            the file to retrain.

    Returns:
        The loaded `Tokenizer`.
    """
    path = default_tokenizer_path(workdir, vocab_size)
    if os.path.exists(path):
        return Tokenizer(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    start = time.perf_counter()
    model_proto = train_sentencepiece(_training_lines(max_training_chars), vocab_size)
    # Write to a unique temp file then rename: a killed run leaves no half file,
    # and processes racing on a shared workdir each rename a complete (identical)
    # model into place.
    fd, tmp_path = tempfile.mkstemp(
        dir=os.path.dirname(path), prefix=".stdlib_sp", suffix=".model.tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model_proto)
        os.chmod(tmp_path, 0o644)  # mkstemp makes it owner-only.
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    logging.info(
        "Trained the stdlib tokenizer (vocab %d) in %.1f s: %s",
        vocab_size, time.perf_counter() - start, path,
    )
    return Tokenizer(path)
