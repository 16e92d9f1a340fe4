"""The array_record and mix sources, tokenizer checks, robust text input, checkpointing."""

import collections
import itertools
import json

import grain
import numpy as np
import pytest

from samba_jax.data import pipeline, sources


def _one_process(**kwargs):
    return dict(process_index=0, process_count=1, **kwargs)


def _stream(ds, n):
    return np.concatenate([b["tokens"].reshape(-1) for b in itertools.islice(ds, n)])


def test_array_record_stream_equals_on_the_fly_jsonl(tiny_tokenizer, prepared):
    output, pattern, _ = prepared
    args = dict(seq_len=13, batch_size=2, seed=9, **_one_process())
    prepared_ds = pipeline.make_dataset(f"array_record:{output}", tiny_tokenizer, **args)
    jsonl_ds = pipeline.make_dataset(f"jsonl:{pattern}", tiny_tokenizer, **args)
    # 400 batches cover more than two epochs, so the reshuffles agree too.
    np.testing.assert_array_equal(_stream(prepared_ds, 400), _stream(jsonl_ds, 400))
    batch = next(iter(prepared_ds))["tokens"]
    assert batch.dtype == np.int32 and batch.shape == (2, 14)


def test_check_source_rejects_another_tokenizer(tiny_tokenizer, other_tokenizer, prepared):
    output, _, _ = prepared
    pipeline.check_source(f"array_record:{output}", tiny_tokenizer)
    pipeline.check_source(f"array_record:{output}", tiny_tokenizer.model_path)
    pipeline.check_source("stdlib", other_tokenizer)  # Nothing to check.
    for check in (
        lambda: pipeline.check_source(f"array_record:{output}", other_tokenizer.model_path),
        lambda: pipeline.check_source(f"mix:1*stdlib,1*array_record:{output}", other_tokenizer),
        lambda: pipeline.make_dataset(f"array_record:{output}", other_tokenizer, 8, 1,
                                      **_one_process()),
    ):
        with pytest.raises(ValueError, match="config.data.tokenizer") as error:
            check()
        assert f"{output}/manifest.json" in str(error.value)
        assert tiny_tokenizer.model_path in str(error.value)


def test_array_record_without_manifest_names_prepare(tiny_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="samba_jax.data.prepare"):
        pipeline.make_dataset(f"array_record:{tmp_path}", tiny_tokenizer, 8, 1, **_one_process())


def test_text_source_repairs_bytes_and_skips_empty_documents(tiny_tokenizer, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good \xff text")
    (tmp_path / "b.txt").write_text(" \n\t")
    (tmp_path / "c.txt").write_text("next")
    documents = sources.make_document_source(f"text:{tmp_path}/*.txt")
    assert [documents[i] for i in range(3)] == ["good \ufffd text", " \n\t", "next"]
    assert documents.stats == {"documents_read": 3, "empty_documents": 1,
                               "invalid_utf8_documents": 1, "replaced_bytes": 1}
    ds = pipeline.make_dataset(f"text:{tmp_path}/*.txt", tiny_tokenizer, 3, 1, shuffle=False,
                               repeat=False, **_one_process())
    stream = _stream(ds, 100)
    expected = [*tiny_tokenizer.encode("good \ufffd text"), tiny_tokenizer.eos_id,
                *tiny_tokenizer.encode("next"), tiny_tokenizer.eos_id]
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert len(expected) - len(stream) < 4  # Only the partial last row is dropped.


def test_jsonl_invalid_utf8_is_replaced(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": ""}\n')
    documents = sources.make_document_source(f"jsonl:{tmp_path}/*.jsonl")
    assert [documents[0], documents[1]] == ["caf\ufffd", ""]
    assert documents.stats["replaced_bytes"] == 1 and documents.stats["empty_documents"] == 1


def test_documents_longer_than_a_row_pack_across_rows(tiny_tokenizer, tmp_path):
    long_text = " ".join(f"word{i}" for i in range(400))
    (tmp_path / "long.txt").write_text(long_text)
    (tmp_path / "short.txt").write_text("short one")
    ids = tiny_tokenizer.encode(long_text)
    assert len(ids) > 10 * 16
    ds = pipeline.make_dataset(f"text:{tmp_path}/*.txt", tiny_tokenizer, 15, 2, shuffle=False,
                               repeat=False, **_one_process())
    stream = _stream(ds, 1000)
    expected = ids + [tiny_tokenizer.eos_id] + tiny_tokenizer.encode("short one")
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert len(expected) - len(stream) < 2 * 16  # All but the last partial batch.


def test_parse_mixture():
    assert sources.parse_mixture("jsonl:/a,b/*.jsonl") == [(1.0, "jsonl:/a,b/*.jsonl")]
    assert sources.parse_mixture("mix:0.7*jsonl:/a,b/*.jsonl, 0.3*array_record:/b") == [
        (0.7, "jsonl:/a,b/*.jsonl"), (0.3, "array_record:/b")]
    for bad in ("mix:", "mix:jsonl:/a", "mix:0*stdlib", "mix:x*stdlib", "mix:1*mix:1*stdlib"):
        with pytest.raises(ValueError, match="mix:<weight>"):
            sources.parse_mixture(bad)


def _mixture(tiny_tokenizer, prepared, seed=3, **kwargs):
    output, _, _ = prepared
    # Component rows are told apart by content: stdlib tokens vs the prepared corpus.
    return pipeline.make_dataset(f"mix:0.75*array_record:{output},0.25*stdlib", tiny_tokenizer,
                                 seq_len=15, batch_size=4, seed=seed, split="validation",
                                 **_one_process(**kwargs))


def test_mixture_proportions_and_determinism(tiny_tokenizer, prepared):
    output, _, _ = prepared
    corpus_rows = {r.tobytes() for b in itertools.islice(pipeline.make_dataset(
        f"array_record:{output}", tiny_tokenizer, 15, 1, seed=3, **_one_process()), 500)
        for r in b["tokens"]}
    batches = [b["tokens"] for b in itertools.islice(_mixture(tiny_tokenizer, prepared), 50)]
    rows = np.concatenate(batches)
    from_corpus = collections.Counter(r.tobytes() in corpus_rows for r in rows)
    assert abs(from_corpus[True] / len(rows) - 0.75) < 0.05
    again = [b["tokens"] for b in itertools.islice(_mixture(tiny_tokenizer, prepared), 50)]
    np.testing.assert_array_equal(np.stack(batches), np.stack(again))
    other_seed = [b["tokens"] for b in itertools.islice(_mixture(tiny_tokenizer, prepared, 4), 50)]
    assert not np.array_equal(np.stack(batches), np.stack(other_seed))


def test_mixture_state_round_trip(tiny_tokenizer, prepared):
    iterator = iter(_mixture(tiny_tokenizer, prepared))
    _ = [next(iterator) for _ in range(37)]
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator)["tokens"] for _ in range(6)]
    restored = iter(_mixture(tiny_tokenizer, prepared))
    restored.set_state(state)
    np.testing.assert_array_equal(np.stack([next(restored)["tokens"] for _ in range(6)]),
                                  np.stack(expected))


@pytest.mark.parametrize("kind", ["stdlib", "array_record", "mix"])
def test_grain_checkpoint_helper(tiny_tokenizer, prepared, kind):
    output, _, _ = prepared
    source = {"stdlib": "stdlib", "array_record": f"array_record:{output}",
              "mix": f"mix:2*array_record:{output},1*stdlib"}[kind]
    ds = pipeline.make_dataset(source, tiny_tokenizer, 31, 2, seed=1, split="validation",
                               max_batches=12, **_one_process())
    grain.experimental.assert_equal_output_after_checkpoint(ds)
