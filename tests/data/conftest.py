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
