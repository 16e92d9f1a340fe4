"""The prepare CLI: formats, manifest, input repair, resumability, argument errors."""

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from samba_jax.data import prepare
from tests.data.conftest import numbered_documents


def _run(tokenizer, output, input_glob, *extra):
    argv = [f"--input={input_glob}", f"--tokenizer={tokenizer.model_path}",
            f"--output={output}", "--workers=1", *extra]
    return prepare.main(argv)


def _manifest(output):
    with open(os.path.join(output, "manifest.json")) as f:
        return json.load(f)


def _records(output):
    manifest = _manifest(output)
    paths = [os.path.join(output, s["file"]) for s in manifest["shards"]]
    source = grain.sources.ArrayRecordDataSource(paths)
    return [np.frombuffer(source[i], dtype="<i4") for i in range(len(source))]


def _same_tree(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        if os.path.isfile(os.path.join(a, name)):
            assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


@pytest.fixture
def messy_text_corpus(tmp_path):
    """Text files: 12 numbered documents, one with invalid UTF-8, one empty."""
    folder = tmp_path / "messy"
    folder.mkdir()
    documents = numbered_documents(12)
    for i, document in enumerate(documents):
        (folder / f"d{i:02d}.txt").write_text(document)
    (folder / "d12_bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    (folder / "d13_empty.txt").write_text("  \n")
    return str(folder / "*.txt"), documents


def test_text_manifest_and_records(tiny_tokenizer, messy_text_corpus, tmp_path):
    pattern, documents = messy_text_corpus
    output = str(tmp_path / "out")
    assert _run(tiny_tokenizer, output, pattern, "--shard_documents=5") == 0
    manifest = _manifest(output)
    records = _records(output)
    assert manifest["documents"] == len(records) == 13  # 12 + the repaired one, empty skipped.
    assert manifest["tokens"] == sum(len(r) for r in records)
    assert manifest["tokenizer"]["sha256"] == tiny_tokenizer.sha256()
    assert manifest["tokenizer"]["vocab_size"] == tiny_tokenizer.vocab_size
    assert manifest["tokenizer"]["eos_id"] == tiny_tokenizer.eos_id
    assert len(manifest["sources"]) == 14 and all(s["bytes"] >= 0 for s in manifest["sources"])
    stats = manifest["input_stats"]
    assert stats["empty_documents"] == 1
    assert stats["invalid_utf8_documents"] == 1 and stats["replaced_bytes"] == 3
    assert stats["long_documents"] == 0
    # Units of 5 input files: [0..4], [5..9], [10..13] (one empty) -> 5, 5, 3 documents.
    assert [s["documents"] for s in manifest["shards"]] == [5, 5, 3]
    assert sum(s["tokens"] for s in manifest["shards"]) == manifest["tokens"]
    for record, document in zip(records, documents):
        assert record[-1] == tiny_tokenizer.eos_id
        assert tiny_tokenizer.decode(record[:-1]) == document
    assert tiny_tokenizer.decode(records[12][:-1]) == "caf\ufffd ok \ufffd\ufffd end"


def test_jsonl_and_parquet_give_the_same_records(tiny_tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    documents = numbered_documents(9) + [""]
    (tmp_path / "a.jsonl").write_text(
        "\n\n".join(json.dumps({"body": d}) for d in documents) + "\n")
    pq.write_table(pa.table({"body": documents}), str(tmp_path / "a.parquet"))
    for fmt in ("jsonl", "parquet"):
        assert _run(tiny_tokenizer, str(tmp_path / fmt), str(tmp_path / f"*.{fmt}"),
                    "--jsonl_field=body", "--shard_documents=4") == 0
    assert _manifest(str(tmp_path / "parquet"))["arguments"]["format"] == "parquet"
    jsonl, parquet = _records(str(tmp_path / "jsonl")), _records(str(tmp_path / "parquet"))
    assert len(jsonl) == 9 and all(np.array_equal(a, b) for a, b in zip(jsonl, parquet))
    assert [s["documents"] for s in _manifest(str(tmp_path / "jsonl"))["shards"]] == [4, 4, 1]
    assert _manifest(str(tmp_path / "jsonl"))["input_stats"]["empty_documents"] == 1


def test_long_documents_are_kept_and_counted(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "LONG_DOCUMENT_TOKENS", 20)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d})
                                                for d in numbered_documents(6)))
    assert _run(tiny_tokenizer, str(tmp_path / "o"), str(tmp_path / "*.jsonl")) == 0
    records = _records(str(tmp_path / "o"))
    long = sum(len(r) > 20 for r in records)
    assert 0 < long < len(records) == 6
    assert _manifest(str(tmp_path / "o"))["input_stats"]["long_documents"] == long


def test_resume_after_partial_run_is_byte_identical(tiny_tokenizer, messy_text_corpus, tmp_path):
    pattern, _ = messy_text_corpus
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    assert _run(tiny_tokenizer, full, pattern, "--shard_documents=4") == 0
    # An interrupted run: the arguments file, unit 1 committed, a half-written shard of unit 2.
    args = prepare._parse_args([f"--input={pattern}", f"--tokenizer={tiny_tokenizer.model_path}",
                                f"--output={resumed}", "--shard_documents=4", "--workers=1"])
    os.makedirs(os.path.join(resumed, prepare.PROGRESS_DIR))
    with open(os.path.join(full, prepare.ARGS_FILE)) as f:
        identity = json.load(f)
    with open(os.path.join(resumed, prepare.ARGS_FILE), "w") as f:
        json.dump(identity, f, indent=1, sort_keys=True)
    paths = sorted(s["path"] for s in identity["sources"])
    prepare.prepare_unit(1, paths[4:8], "text", "text", 4, resumed, tiny_tokenizer)
    (tmp_path / "resumed" / "shard-00002-0000.array_record.tmp").write_bytes(b"partial")
    assert prepare.main([f"--{k}={v}" for k, v in vars(args).items()]) == 0
    _same_tree(full, resumed)
    _same_tree(os.path.join(full, prepare.PROGRESS_DIR), os.path.join(resumed, prepare.PROGRESS_DIR))


def test_worker_processes_write_the_same_files(tiny_tokenizer, messy_text_corpus, tmp_path):
    pattern, _ = messy_text_corpus
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert _run(tiny_tokenizer, one, pattern, "--shard_documents=4") == 0
    argv = [f"--input={pattern}", f"--tokenizer={tiny_tokenizer.model_path}", f"--output={two}",
            "--shard_documents=4", "--workers=2"]
    assert prepare.main(argv) == 0
    _same_tree(one, two)


def test_killed_subprocess_resumes_to_identical_output(tiny_tokenizer, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i, document in enumerate(numbered_documents(300)):
        (folder / f"{i:03d}.txt").write_text(document * 40)
    argv = [sys.executable, "-m", "samba_jax.data.prepare", f"--input={folder}/*.txt",
            f"--tokenizer={tiny_tokenizer.model_path}", "--shard_documents=10", "--workers=1"]
    full = str(tmp_path / "full")
    subprocess.run(argv + [f"--output={full}"], check=True, capture_output=True)
    killed = str(tmp_path / "killed")
    process = subprocess.Popen(argv + [f"--output={killed}"], stderr=subprocess.DEVNULL)
    first_unit = os.path.join(killed, prepare.PROGRESS_DIR, "unit-00000.json")
    deadline = time.time() + 60
    while not os.path.exists(first_unit) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = not os.path.exists(os.path.join(killed, "manifest.json"))
    subprocess.run(argv + [f"--output={killed}"], check=True, capture_output=True)
    _same_tree(full, killed)  # including no leftover .tmp shard from the kill
    assert interrupted  # 30 work units: the kill always lands before the manifest is written


def test_refuses_other_arguments_or_tokenizer(tiny_tokenizer, messy_text_corpus, tmp_path,
                                              capsys):
    pattern, _ = messy_text_corpus
    output = str(tmp_path / "out")
    assert _run(tiny_tokenizer, output, pattern, "--shard_documents=5") == 0
    assert _run(tiny_tokenizer, output, pattern, "--shard_documents=5") == 0  # Same: fine.
    assert _run(tiny_tokenizer, output, pattern, "--shard_documents=6") == 2
    assert "--shard_documents" in capsys.readouterr().err
    (tmp_path / "messy" / "d00.txt").write_text("changed")
    assert _run(tiny_tokenizer, output, pattern, "--shard_documents=5") == 2
    assert "--input" in capsys.readouterr().err
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "x").write_text("x")
    assert _run(tiny_tokenizer, str(tmp_path / "stranger"), pattern) == 2
    assert "non-empty directory" in capsys.readouterr().err


def test_refuses_a_different_tokenizer(tiny_tokenizer, other_tokenizer, messy_text_corpus,
                                       tmp_path, capsys):
    pattern, _ = messy_text_corpus
    output = str(tmp_path / "out")
    assert _run(tiny_tokenizer, output, pattern) == 0
    assert _run(other_tokenizer, output, pattern) == 2
    assert "--tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--workers=0"], "--workers"),
    (["--shard_documents=-1"], "--shard_documents"),
    (["--format=csv"], "--format"),
])
def test_bad_flags_exit_with_usage(tiny_tokenizer, messy_text_corpus, tmp_path, capsys, flags,
                                   message):
    pattern, _ = messy_text_corpus
    with pytest.raises(SystemExit) as exit_info:
        _run(tiny_tokenizer, str(tmp_path / "o"), pattern, *flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_inputs_name_the_flag(tiny_tokenizer, messy_text_corpus, tmp_path, capsys):
    pattern, _ = messy_text_corpus
    assert _run(tiny_tokenizer, str(tmp_path / "o"), str(tmp_path / "none" / "*.txt")) == 2
    assert "--input" in capsys.readouterr().err
    assert prepare.main([f"--input={pattern}", f"--tokenizer={tmp_path}/no.model",
                         f"--output={tmp_path}/o2"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    (tmp_path / "messy" / "x.jsonl").write_text('{"text": "a"}\n')
    assert _run(tiny_tokenizer, str(tmp_path / "o3"), str(tmp_path / "messy" / "*")) == 2
    assert "--format" in capsys.readouterr().err
    assert _run(tiny_tokenizer, str(tmp_path / "o4"), str(tmp_path / "messy" / "*.jsonl"),
                "--jsonl_field=body") == 2
    assert "jsonl_field" in capsys.readouterr().err
