"""What every evaluation task reads first: the model, its tokenizer and the evaluation text.

`--checkpoint` is anything `samba_jax.load` reads (a training workdir, an orbax export, a
safetensors directory in our, the reference's or Hugging Face's layout). A training workdir also
names its tokenizer and data source (config.json); for an export pass `--tokenizer`.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from samba_jax.config import ConfigError, ModelConfig
from samba_jax.data import sources
from samba_jax.data import tokenizer as tokenizer_lib
from samba_jax.data.pipeline import TokenizeWithEos, get_tokenizer


class Loaded(NamedTuple):
    cfg: ModelConfig
    params: Any
    tokenizer: tokenizer_lib.Tokenizer | None
    source: str  # the training data source of a workdir ("" for an export)
    description: str  # what was loaded, for the results file


def load_model(checkpoint: str, tokenizer_path: str = "", step: int | None = None) -> Loaded:
    """The model of `checkpoint`, and its tokenizer (`tokenizer_path`, else the workdir's own)."""
    from samba_jax import export

    if not os.path.isdir(checkpoint):
        raise ConfigError(f"--checkpoint={checkpoint} is not a directory. Fix: pass a training workdir or an "
                          "export directory (python -m samba_jax.export).")
    model = export.load(checkpoint, step)
    source, tok = "", None
    config_path = os.path.join(checkpoint, "config.json")
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")) and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            data = json.load(f).get("data", {})
        source = data.get("source", "")
        if not tokenizer_path:
            tok = get_tokenizer(source, data.get("tokenizer") or None, checkpoint, model.cfg.vocab_size)
    if tokenizer_path:
        tok = tokenizer_lib.Tokenizer(tokenizer_path)
    if tok is not None and tok.vocab_size != model.cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} pieces but the model's vocabulary is "
                          f"{model.cfg.vocab_size}. Fix: pass the model's own --tokenizer.")
    pattern = ",".join(model.cfg.pattern)
    return Loaded(model.cfg, model.params, tok, source, f"{checkpoint} ({pattern} x {model.cfg.num_repeats})")


def need_tokenizer(loaded: Loaded, task: str) -> tokenizer_lib.Tokenizer:
    if loaded.tokenizer is None:
        raise ConfigError(f"{task} needs the model's tokenizer and --checkpoint is an export. Fix: pass "
                          "--tokenizer=PATH/TO/spm.model.")
    return loaded.tokenizer


def document_tokens(source: str, split: str, tokenizer: tokenizer_lib.Tokenizer | None, jsonl_field: str = "text"):
    """Yields each document of `source` (a training source spec) as int32 ids ending in EOS."""
    documents = sources.make_document_source(source, split, jsonl_field)
    tokenized = getattr(documents, "tokenized", False)
    if not tokenized and tokenizer is None:
        raise ConfigError(f"--data={source} is text and needs a tokenizer. Fix: pass --tokenizer=PATH.")
    encode = None if tokenized else TokenizeWithEos(tokenizer)
    for i in range(len(documents)):
        doc = documents[i]
        if tokenized:
            yield np.asarray(doc, np.int32)
        elif doc.strip():
            yield encode(doc)


def long_rows(source: str, split: str, tokenizer: tokenizer_lib.Tokenizer | None, length: int, rows: int,
              concat_documents: bool, jsonl_field: str = "text") -> tuple[np.ndarray, dict]:
    """(rows, length + 1) int32 for scoring `length` tokens per row, and how they were made.

    Without `concat_documents` each row is the start of one document of at least length + 1 tokens
    (shorter ones are skipped and counted); with it the documents are joined (EOS between them) into
    one stream cut into consecutive rows.
    """
    need = length + 1
    out, skipped, used, stream, have = [], 0, 0, [], 0
    for doc in document_tokens(source, split, tokenizer, jsonl_field):
        if concat_documents:
            stream.append(doc)
            have += len(doc)
            used += 1
            while have >= need and len(out) < rows:
                joined = np.concatenate(stream)
                out.append(joined[:need])
                stream, have = [joined[need:]], len(joined) - need
        elif len(doc) >= need:
            out.append(doc[:need])
            used += 1
        else:
            skipped += 1
        if len(out) == rows:
            break
    if not out:
        hint = ("Fix: lower --max_length, or pass --concat_documents to join documents into one stream."
                if not concat_documents else "Fix: lower --max_length or use a larger --data source.")
        raise ConfigError(f"--data={source} ({split}) has no {'stream' if concat_documents else 'document'} of "
                          f"{need:,} tokens ({skipped} documents were shorter). {hint}")
    info = {"source": source, "split": split, "rows": len(out), "rows_requested": rows,
            "concat_documents": concat_documents, "documents_used": used, "documents_too_short": skipped}
    return np.stack(out).astype(np.int32), info
