"""The held-out split of sources without their own validation (samba_jax/data/holdout.py)."""

import json

import numpy as np
import pytest

from samba_jax.data import holdout, pipeline


def test_the_splits_partition_the_documents_the_same_way_every_time():
    docs = [f"document {i}" for i in range(3000)]
    train, val = holdout.HeldOutSplit(docs, "train", 10), holdout.HeldOutSplit(docs, "validation", 10)
    taken = {train[i] for i in range(len(train))} | {val[i] for i in range(len(val))}
    assert len(train) + len(val) == 3000 and len(taken) == 3000
    assert 10 <= len(val) <= 60  # about 1%
    again = holdout.HeldOutSplit(docs, "validation", 10)
    assert [again[i] for i in range(len(again))] == [val[i] for i in range(len(val))]


def test_a_small_source_still_holds_one_document_out_and_one_document_cannot():
    small = holdout.HeldOutSplit(["a", "b", "c"], "validation", 10)
    assert len(small) == 1 and len(holdout.HeldOutSplit(["a", "b", "c"], "train", 10)) == 2
    assert len(holdout.HeldOutSplit(["only"], "validation", 10)) == 0


def test_make_dataset_names_a_source_too_small_to_split(tmp_path, tiny_tokenizer):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "def f(x):\n    return x\n" * 50}) + "\n")
    with pytest.raises(ValueError, match="holdout_permille=0"):
        next(iter(pipeline.make_dataset(f"jsonl:{path}", tiny_tokenizer, 16, 1, split="validation",
                                        holdout_permille=10, process_index=0, process_count=1)))
    rows = next(iter(pipeline.make_dataset(f"jsonl:{path}", tiny_tokenizer, 16, 1, split="train",
                                           holdout_permille=10, process_index=0, process_count=1)))
    assert np.asarray(rows["tokens"]).shape == (1, 17)
