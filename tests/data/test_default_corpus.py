"""The embedded stdlib corpus: stable, disjoint splits with real content."""

import pydoc_data.topics
import subprocess
import sys

import pytest

from samba_jax.data import default_corpus


def _names(split):
    return [d.name for d in default_corpus.load_named_documents(split)]


def test_splits_are_nonempty_disjoint_and_sorted():
    train, validation = _names("train"), _names("validation")
    assert len(train) > 300 and len(validation) > 5
    assert not set(train) & set(validation)
    assert train == sorted(train) and validation == sorted(validation)
    assert len(set(train)) == len(train)


def test_validation_is_a_small_fraction():
    train, validation = len(_names("train")), len(_names("validation"))
    assert 0.01 < validation / (train + validation) < 0.10


def test_split_is_identical_in_a_fresh_process():
    # A fresh interpreter has a different PYTHONHASHSEED; the split must not care.
    code = (
        "from samba_jax.data import default_corpus as c;"
        "print('\\n'.join(d.name for d in c.load_named_documents('validation')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": ":".join(sys.path)},
    ).stdout
    assert out.split("\n")[:-1] == _names("validation")


def test_split_of_is_a_pure_function_of_the_name():
    for name in _names("validation"):
        assert default_corpus.split_of(name) == "validation"
    for name in _names("train")[:50]:
        assert default_corpus.split_of(name) == "train"


def test_pydoc_topics_are_documents_with_their_text():
    documents = {d.name: d.text for s in default_corpus.SPLITS
                 for d in default_corpus.load_named_documents(s)}
    topics = {t: text for t, text in pydoc_data.topics.topics.items() if text.strip()}
    for topic, text in topics.items():
        assert documents[f"pydoc/{topic}"] == text


def test_stdlib_sources_present_and_skipped_dirs_absent():
    names = _names("train") + _names("validation")
    assert "stdlib/json/decoder.py" in names or "stdlib/json/encoder.py" in names
    for name in names:
        parts = name.split("/")
        assert not {"test", "tests", "idlelib", "site-packages"} & set(parts), name
        assert parts[0] == "pydoc" or name.endswith(".py")


def test_load_documents_matches_named_documents_and_is_cached():
    texts = default_corpus.load_documents("train")
    named = default_corpus.load_named_documents("train")
    assert texts == [d.text for d in named]
    assert all(texts) and all(isinstance(t, str) for t in texts)
    # Cached: the same string objects come back, and callers get their own list.
    again = default_corpus.load_documents("train")
    assert again is not texts and again[0] is texts[0]


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="test"):
        default_corpus.load_documents("test")
