"""The grain pipeline: packing, sharding, determinism, checkpoint resume."""

import itertools
import json
import re

import grain
import numpy as np
import pytest

from samba_jax.data import default_corpus, pipeline
from samba_jax.data import tokenizer as tokenizer_lib
from tests.conftest import TINY_VOCAB


def _take(dataset_or_iterator, n):
    return [b["tokens"] for b in itertools.islice(dataset_or_iterator, n)]


def _stream(batches):
    """Concatenates batches (batch, row) into one token stream."""
    return np.concatenate([b.reshape(-1) for b in batches])


def _documents_in(stream, tokenizer):
    """Decodes the complete (EOS-terminated) documents of a token stream."""
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(stream[s:e]) for s, e in zip(starts, ends)]


def _packing_offset(state):
    """The packer's offset into its current document, wherever it sits in `state`."""
    if "offset" in state:
        return state["offset"]
    return _packing_offset(state["parent"])


def _one_process(**kwargs):
    return dict(process_index=0, process_count=1, **kwargs)


def test_batches_are_int32_rows_of_seq_len_plus_one(tiny_tokenizer):
    ds = pipeline.make_dataset("stdlib", tiny_tokenizer, seq_len=33, batch_size=3, seed=1,
                               **_one_process())
    for batch in itertools.islice(ds, 4):
        assert set(batch) == {"tokens"}
        assert batch["tokens"].shape == (3, 34) and batch["tokens"].dtype == np.int32
        assert batch["tokens"].min() >= 0 and batch["tokens"].max() < TINY_VOCAB


def test_one_epoch_is_the_shuffled_documents_back_to_back(tiny_tokenizer, jsonl_corpus):
    pattern, documents = jsonl_corpus
    seq_len, batch_size, seed = 15, 2, 7
    order = list(grain.MapDataset.range(len(documents)).shuffle(seed=seed))
    assert order != sorted(order)
    expected = np.concatenate(
        [tiny_tokenizer.encode(documents[i]) + [tiny_tokenizer.eos_id] for i in order])
    row = seq_len + 1
    full_batches = len(expected) // (row * batch_size)
    ds = pipeline.make_dataset(f"jsonl:{pattern}", tiny_tokenizer, seq_len, batch_size, seed=seed,
                               **_one_process())
    got = _stream(_take(ds, full_batches))
    np.testing.assert_array_equal(got, expected[: len(got)])
    # Only the tail shorter than one batch is missing from the epoch.
    assert len(expected) - len(got) < row * batch_size
    # EOS separates every document: each decodes back to its source text.
    assert _documents_in(got, tiny_tokenizer) == [documents[i] for i in order][
        : int(np.sum(got == tiny_tokenizer.eos_id))]


def test_next_epoch_is_reshuffled(tiny_tokenizer, jsonl_corpus):
    pattern, documents = jsonl_corpus
    ds = pipeline.make_dataset(f"jsonl:{pattern}", tiny_tokenizer, 7, 1, seed=3, **_one_process())
    decoded = _documents_in(_stream(_take(ds, 3000)), tiny_tokenizer)
    first, second = decoded[: len(documents)], decoded[len(documents): 2 * len(documents)]
    assert sorted(first) == sorted(documents) == sorted(second)
    assert first != second


def test_two_processes_read_disjoint_documents(tiny_tokenizer, text_corpus):
    pattern, documents = text_corpus
    seen = []
    for index in range(2):
        ds = pipeline.make_dataset(f"text:{pattern}", tiny_tokenizer, 5, 1, seed=11, repeat=False,
                                   process_index=index, process_count=2)
        seen.append(set(_documents_in(_stream(_take(ds, 10_000)), tiny_tokenizer)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] <= set(documents)
    # Each process's last document may lose its tail; every other one is seen.
    assert len(seen[0] | seen[1]) >= len(documents) - 2
    assert abs(len(seen[0]) - len(seen[1])) <= 2


def test_same_seed_same_batches_other_seed_other_batches(tiny_tokenizer):
    def first_batches(seed):
        ds = pipeline.make_dataset("stdlib", tiny_tokenizer, 31, 2, seed=seed, split="validation",
                                   **_one_process())
        return _stream(_take(ds, 5))

    np.testing.assert_array_equal(first_batches(0), first_batches(0))
    assert not np.array_equal(first_batches(0), first_batches(1))


@pytest.mark.parametrize("steps_before_save", [0, 1, 13, 150, 320])
def test_restored_iterator_continues_exactly(tiny_tokenizer, jsonl_corpus, steps_before_save):
    # An epoch of this corpus is ~153 batches: 150 restores just before the
    # reshuffle at the epoch boundary, 320 in the third epoch.
    pattern, _ = jsonl_corpus
    ds = pipeline.make_dataset(f"jsonl:{pattern}", tiny_tokenizer, 9, 2, seed=5, **_one_process())
    iterator = iter(ds)
    _take(iterator, steps_before_save)
    state = json.loads(json.dumps(iterator.get_state()))  # As grain.checkpoint stores it.
    expected = _take(iterator, 8)
    restored = iter(ds)
    restored.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(restored, 8)), np.stack(expected))


def test_stdlib_restore_mid_long_document(tiny_tokenizer):
    ds = pipeline.make_dataset("stdlib", tiny_tokenizer, 127, 4, seed=2, **_one_process())
    iterator = iter(ds)
    _take(iterator, 3)
    state = iterator.get_state()
    assert _packing_offset(state) > 0  # The next row starts inside a document.
    expected = _take(iterator, 3)
    restored = iter(ds)
    restored.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(np.stack(_take(restored, 3)), np.stack(expected))


def test_orbax_checkpoint_round_trip(tiny_tokenizer, jsonl_corpus, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    pattern, _ = jsonl_corpus
    ds = pipeline.make_dataset(f"jsonl:{pattern}", tiny_tokenizer, 9, 2, seed=5, **_one_process())
    iterator = iter(ds)
    assert isinstance(iterator, grain.DatasetIterator)
    _take(iterator, 7)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as manager:
        save = grain.checkpoint.CheckpointSave(iterator)
        manager.save(7, args=ocp.args.Composite(data_iter=save))
        manager.wait_until_finished()
        expected = _take(iterator, 5)
        restored = iter(ds)
        restore = grain.checkpoint.CheckpointRestore(restored)
        manager.restore(7, args=ocp.args.Composite(data_iter=restore))
    np.testing.assert_array_equal(np.stack(_take(restored, 5)), np.stack(expected))


def test_worker_processes_restore_exactly(tiny_tokenizer):
    ds = pipeline.make_dataset("stdlib", tiny_tokenizer, 63, 2, seed=4, split="validation",
                               worker_count=2, **_one_process())
    iterator = iter(ds)
    _take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, 4)
    iterator.close()
    restored = iter(ds)
    restored.set_state(state)
    got = _take(restored, 4)
    restored.close()
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))


def test_eval_iterator_is_finite_deterministic_and_complete(tiny_tokenizer):
    def eval_batches(**kwargs):
        ds = pipeline.make_dataset("stdlib", tiny_tokenizer, 255, 4, split="validation",
                                   shuffle=False, repeat=False, **_one_process(), **kwargs)
        return [b["tokens"] for b in ds]

    batches = eval_batches()
    assert batches and all(b.shape == (4, 256) for b in batches)
    np.testing.assert_array_equal(np.stack(batches), np.stack(eval_batches(seed=99)))
    documents = default_corpus.load_documents("validation")
    total = sum(len(tiny_tokenizer.encode(d)) + 1 for d in documents)
    assert len(batches) == total // (4 * 256)
    # Unshuffled: the stream starts with the first validation document.
    first = tiny_tokenizer.encode(documents[0])
    np.testing.assert_array_equal(_stream(batches)[: len(first)], first)
    limited = eval_batches(max_batches=3)
    np.testing.assert_array_equal(np.stack(limited), np.stack(batches[:3]))


def test_eval_dataset_restores_from_every_state(tiny_tokenizer, text_corpus):
    pattern, _ = text_corpus
    ds = pipeline.make_dataset(f"text:{pattern}", tiny_tokenizer, 11, 2, seed=0, shuffle=False,
                               repeat=False, **_one_process())
    grain.experimental.assert_equal_output_after_checkpoint(ds)


def test_text_source_reads_each_file_as_one_document(tiny_tokenizer, text_corpus):
    pattern, documents = text_corpus
    ds = pipeline.make_dataset(f"text:{pattern}", tiny_tokenizer, 7, 1, shuffle=False,
                               repeat=False, **_one_process())
    decoded = _documents_in(_stream([b["tokens"] for b in ds]), tiny_tokenizer)
    assert decoded == sorted(documents, key=lambda d: int(d.split(":")[0][4:]) % 3)[: len(decoded)]
    assert len(decoded) >= len(documents) - 1


def test_jsonl_field_is_configurable(tiny_tokenizer, tmp_path):
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps({"body": f"record {i} " * 5}) for i in range(10)))
    ds = pipeline.make_dataset(f"jsonl:{tmp_path}/*.jsonl", tiny_tokenizer, 7, 1, shuffle=False,
                               repeat=False, jsonl_field="body", **_one_process())
    decoded = _documents_in(_stream([b["tokens"] for b in ds]), tiny_tokenizer)
    assert decoded[:3] == ["record 0 " * 5, "record 1 " * 5, "record 2 " * 5]
    wrong_field = pipeline.make_dataset(f"jsonl:{tmp_path}/*.jsonl", tiny_tokenizer, 7, 1,
                                        **_one_process())
    with pytest.raises(KeyError, match="jsonl_field"):
        next(iter(wrong_field))


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_empty_glob_error_names_the_glob(tiny_tokenizer, tmp_path, kind):
    pattern = str(tmp_path / "missing" / "*.none")
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
        pipeline.make_dataset(f"{kind}:{pattern}", tiny_tokenizer, 8, 1, **_one_process())


def test_unknown_source_raises(tiny_tokenizer):
    with pytest.raises(ValueError, match="parquet"):
        pipeline.make_dataset("parquet:/x/*.pq", tiny_tokenizer, 8, 1, **_one_process())


def test_get_tokenizer_reuses_the_workdir_cache(tiny_tokenizer_workdir, tiny_tokenizer):
    tokenizer = pipeline.get_tokenizer("stdlib", "", str(tiny_tokenizer_workdir), TINY_VOCAB)
    assert tokenizer.serialized_proto() == tiny_tokenizer.serialized_proto()


def test_get_tokenizer_loads_a_path_and_rejects_missing_ones(tiny_tokenizer, tmp_path):
    path = tokenizer_lib.default_tokenizer_path(str(tmp_path), 1)
    with pytest.raises(FileNotFoundError, match="stdlib_sp1.model"):
        pipeline.get_tokenizer("text:/x/*.txt", path, str(tmp_path))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        pipeline.get_tokenizer("text:/x/*.txt", "", str(tmp_path))
    loaded = pipeline.get_tokenizer("stdlib", tiny_tokenizer.model_path, str(tmp_path), 4096)
    assert loaded.vocab_size == TINY_VOCAB
