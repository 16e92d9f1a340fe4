"""SentencePiece wrapper and the cached default tokenizer."""

import os
import pickle

import pytest

from samba_jax.data import tokenizer as tokenizer_lib
from tests.conftest import TINY_VOCAB

SAMPLES = [
    "def f(x):\n\treturn  x + 1\n\n\n    # indented comment\n",
    "  leading and trailing spaces  ",
    "Unicode: café, naïve, 日本語, emoji 😀, math ∑ and a NUL-free \x7f byte",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_inverts_encode_exactly(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text


def test_special_ids_and_no_bos_or_eos_added(tiny_tokenizer):
    assert tiny_tokenizer.vocab_size == TINY_VOCAB
    assert tiny_tokenizer.eos_id == tokenizer_lib.DEFAULT_EOS_ID
    assert tiny_tokenizer.pad_id == tokenizer_lib.DEFAULT_PAD_ID
    ids = tiny_tokenizer.encode("import os\nprint(os.sep)")
    assert ids and tiny_tokenizer.eos_id not in ids and tiny_tokenizer.pad_id not in ids
    assert all(0 <= i < tiny_tokenizer.vocab_size for i in ids)


def test_byte_fallback_never_emits_unknown(tiny_tokenizer):
    ids = tiny_tokenizer.encode("𓀀 ᚠᛇᚻ ⿰ unusual scripts")
    assert tokenizer_lib.DEFAULT_UNK_ID not in ids


def test_cached_model_is_reused_without_training(tiny_tokenizer_workdir, monkeypatch):
    path = tokenizer_lib.default_tokenizer_path(str(tiny_tokenizer_workdir), TINY_VOCAB)
    mtime = os.path.getmtime(path)

    def fail_training(*args, **kwargs):
        raise AssertionError("a cached tokenizer must not be retrained")

    monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", fail_training)
    tokenizer = tokenizer_lib.train_default_tokenizer(
        str(tiny_tokenizer_workdir), TINY_VOCAB, max_training_chars=300_000
    )
    assert tokenizer.model_path == path and os.path.getmtime(path) == mtime


def test_training_is_deterministic(tmp_path, tiny_tokenizer):
    tokenizer = tokenizer_lib.train_default_tokenizer(
        str(tmp_path), TINY_VOCAB, max_training_chars=300_000
    )
    assert tokenizer.serialized_proto() == tiny_tokenizer.serialized_proto()
    assert os.listdir(tmp_path / "tokenizer") == [f"stdlib_sp{TINY_VOCAB}.model"]


def test_failed_write_leaves_no_model_or_temp_file(tmp_path, monkeypatch):
    def killed_rename(src, dst):
        raise KeyboardInterrupt("killed while installing the model")

    monkeypatch.setattr(tokenizer_lib.os, "replace", killed_rename)
    with pytest.raises(KeyboardInterrupt):
        tokenizer_lib.train_default_tokenizer(str(tmp_path), TINY_VOCAB, max_training_chars=50_000)
    assert os.listdir(tmp_path / "tokenizer") == []


def test_missing_model_error_names_the_path_and_the_fix(tmp_path):
    missing = str(tmp_path / "nowhere" / "sp.model")
    with pytest.raises(FileNotFoundError) as error:
        tokenizer_lib.Tokenizer(missing)
    assert missing in str(error.value) and "train_default_tokenizer" in str(error.value)


def test_tokenizer_survives_pickling_without_its_file(tmp_path, tiny_tokenizer):
    # Grain workers get the tokenizer by pickle; the model bytes travel with it.
    copy_path = tmp_path / "copy.model"
    copy_path.write_bytes(tiny_tokenizer.serialized_proto())
    tokenizer = tokenizer_lib.Tokenizer(str(copy_path))
    payload = pickle.dumps(tokenizer)
    copy_path.unlink()
    restored = pickle.loads(payload)
    text = "class A:\n    pass\n"
    assert restored.encode(text) == tiny_tokenizer.encode(text)
    assert restored.vocab_size == tiny_tokenizer.vocab_size
