"""Shared fixtures for the data tests: small corpora on disk (the tiny tokenizer is in tests/conftest.py)."""

import json

import pytest


def numbered_documents(count: int) -> list[str]:
    """Distinct documents of varied length; document i starts with "doc i:"."""
    words = ["alpha", "beta", "gamma", "delta", "import os", "def f(x):", "\n    return"]
    return [
        f"doc {i}: " + " ".join(words[(i + j) % len(words)] for j in range(3 + (7 * i) % 23))
        for i in range(count)
    ]


@pytest.fixture
def jsonl_corpus(tmp_path):
    """Two JSONL files holding 40 numbered documents (plus a blank line to skip)."""
    documents = numbered_documents(40)
    for name, part in (("a.jsonl", documents[:25]), ("b.jsonl", documents[25:])):
        lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(part)]
        (tmp_path / name).write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    return str(tmp_path / "*.jsonl"), documents


@pytest.fixture
def text_corpus(tmp_path):
    """30 numbered documents, one per `.txt` file in nested folders."""
    documents = numbered_documents(30)
    for i, document in enumerate(documents):
        folder = tmp_path / "texts" / f"part{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"doc{i:02d}.txt").write_text(document)
    return str(tmp_path / "texts" / "**" / "*.txt"), documents


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer trained on less text than `tiny_tokenizer`: same vocab, other ids."""
    from samba_jax.data import tokenizer as tokenizer_lib

    workdir = tmp_path_factory.mktemp("other_tokenizer")
    return tokenizer_lib.train_default_tokenizer(str(workdir), 512, max_training_chars=60_000)


@pytest.fixture
def prepared(tiny_tokenizer, jsonl_corpus, tmp_path):
    """`jsonl_corpus` prepared with `tiny_tokenizer`: (output dir, jsonl glob, documents)."""
    from samba_jax.data import prepare

    pattern, documents = jsonl_corpus
    output = str(tmp_path / "prepared")
    assert prepare.main([f"--input={pattern}", f"--tokenizer={tiny_tokenizer.model_path}",
                         f"--output={output}", "--workers=1", "--shard_documents=8"]) == 0
    return output, pattern, documents
