"""Tokenizes a text corpus once into ArrayRecord shards for the "array_record:<dir>" source.

    python -m samba_jax.data.prepare --input='data/*.jsonl' --tokenizer=sp.model \\
        --output=prepared/ [--format=auto|text|jsonl|parquet] [--jsonl_field=text] \\
        [--workers=N] [--shard_documents=N]

Input (files matching --input, sorted): "text" = one document per file, "jsonl" = one per
non-blank line (text in --jsonl_field), "parquet" = one per row (column --jsonl_field);
"auto" picks by extension (.jsonl/.json, .parquet/.pq, anything else is text).

Work units, fixed by the arguments alone: for text, unit k is input files
[k*m, (k+1)*m) with m = --shard_documents; for jsonl/parquet, unit k is input file k.
Unit k writes `shard-<k>-<part>.array_record` (at most --shard_documents documents each).
Record = one document's token ids + EOS as raw little-endian int32 bytes (no pickle).

Resumable: each shard is written to a temp name and renamed; then the unit's summary
`.progress/unit-<k>.json` is renamed into place (the unit's commit point); the
manifest is written last. A rerun with the same arguments skips committed units and
yields byte-identical files. `.prepare_args.json` (written first) makes a rerun with
other arguments, inputs or tokenizer fail instead of mixing outputs.

Parallelism is over work units: --workers spawned processes (so a script calling
`prepare()` with workers > 1 needs the usual `if __name__ == "__main__":` guard).

Input repair, counted in the manifest: invalid UTF-8 bytes -> U+FFFD, empty
(whitespace-only) documents skipped, documents over LONG_DOCUMENT_TOKENS kept.
Paths never go through a shell; nothing is executed or unpickled.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from samba_jax.data import sources
from samba_jax.data import tokenizer as tokenizer_lib
from samba_jax.data.text_decoding import decode_utf8

FORMATS = ("auto", "text", "jsonl", "parquet")
LONG_DOCUMENT_TOKENS = 1 << 16  # Counted only: packing splits them across rows anyway.
ARGS_FILE = ".prepare_args.json"
PROGRESS_DIR = ".progress"
_STAT_KEYS = ("empty_documents", "invalid_utf8_documents", "replaced_bytes", "long_documents")


class PrepareError(Exception):
    """A user error: the message names the flag to fix."""


def _format_of(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}.get(
        extension, "text")


def _texts(path: str, fmt: str, field: str, stats: dict) -> Iterator[str]:
    """Documents of one input file, invalid UTF-8 replaced and counted in `stats`."""

    def decode(data: bytes) -> str:
        text, bad = decode_utf8(data)
        stats["invalid_utf8_documents"] += bool(bad)
        stats["replaced_bytes"] += bad
        return text

    if fmt == "text":
        with open(path, "rb") as f:
            yield decode(f.read())
    elif fmt == "jsonl":
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield sources.parse_jsonl_line(line, field, f"{path}:{number}", decode)
    else:
        import pyarrow.parquet as pq  # Only parquet inputs need pyarrow.

        table = pq.ParquetFile(path)
        if field not in table.schema_arrow.names:
            raise KeyError(f"{path}: Parquet file has no column {field!r} (columns:"
                           f" {table.schema_arrow.names}); set --jsonl_field.")
        for batch in table.iter_batches(columns=[field]):
            for value in batch.column(0).to_pylist():
                yield decode(value) if isinstance(value, bytes) else str(value or "")


def _units(paths: Sequence[str], fmt: str, shard_documents: int) -> list[list[str]]:
    if fmt == "text":
        return [list(paths[i : i + shard_documents]) for i in range(0, len(paths), shard_documents)]
    return [[p] for p in paths]


def _replace_atomically(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def prepare_unit(unit: int, paths: Sequence[str], fmt: str, field: str, shard_documents: int,
                 output: str, tokenizer: tokenizer_lib.Tokenizer) -> dict:
    """Tokenizes one work unit into its shards and commits its summary file.

    Returns:
        {"shards": [{"file", "documents", "tokens"}], "stats": {...}} as committed.
    """
    from array_record.python import array_record_module  # Deferred: heavy import.

    stats = dict.fromkeys(_STAT_KEYS, 0)
    shards, writer, name, count, tokens = [], None, "", 0, 0

    def close_shard():
        writer.close()
        os.replace(os.path.join(output, name + ".tmp"), os.path.join(output, name))
        shards.append({"file": name, "documents": count, "tokens": tokens})

    for path in paths:
        for text in _texts(path, fmt, field, stats):
            if not text.strip():
                stats["empty_documents"] += 1
                continue
            ids = np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], dtype="<i4")
            stats["long_documents"] += len(ids) > LONG_DOCUMENT_TOKENS
            if writer is None:
                name = f"shard-{unit:05d}-{len(shards):04d}.array_record"
                # group_size:1 keeps random access (grain's global shuffle) cheap.
                writer = array_record_module.ArrayRecordWriter(
                    os.path.join(output, name + ".tmp"), "group_size:1")
                count = tokens = 0
            writer.write(ids.tobytes())
            count, tokens = count + 1, tokens + len(ids)
            if count == shard_documents:
                close_shard()
                writer = None
    if writer is not None:
        close_shard()
    summary = {"shards": shards, "stats": stats}
    _replace_atomically(_unit_file(output, unit), json.dumps(summary, sort_keys=True).encode())
    return summary


def _unit_file(output: str, unit: int) -> str:
    return os.path.join(output, PROGRESS_DIR, f"unit-{unit:05d}.json")


_WORKER_TOKENIZER: tokenizer_lib.Tokenizer | None = None


def _init_worker(tokenizer: tokenizer_lib.Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _run_unit(task: tuple) -> int:
    prepare_unit(*task, tokenizer=_WORKER_TOKENIZER)
    return task[0]


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m samba_jax.data.prepare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="Glob of input files (recursive **).")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file.")
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--jsonl_field", default="text", help="JSONL field / Parquet column.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard_documents", type=int, default=10_000,
                        help="Documents per shard at most (text: input files per shard).")
    args = parser.parse_args(argv)
    for flag in ("workers", "shard_documents"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}.")
    return args


def _check_previous_run(output: str, identity: dict) -> None:
    """Refuses an output directory prepared with other arguments or inputs."""
    path = os.path.join(output, ARGS_FILE)
    if not os.path.exists(path):
        if os.path.isdir(output) and os.listdir(output):
            raise PrepareError(f"--output={output} is a non-empty directory that prepare did not"
                               " write; pass a new or empty --output directory.")
        return
    with open(path) as f:
        previous = json.load(f)
    for key, flag in (("tokenizer_sha256", "--tokenizer"), ("format", "--format"),
                      ("jsonl_field", "--jsonl_field"), ("shard_documents", "--shard_documents"),
                      ("input", "--input"), ("sources", "--input (the files or their sizes)")):
        if previous.get(key) != identity[key]:
            shown = "" if key == "sources" else f": before {previous.get(key)!r}, now {identity[key]!r}"
            raise PrepareError(
                f"--output={output} was prepared with a different {flag}{shown}. Fix: rerun with"
                f" the original {flag}, or pass a new --output (or delete {output}).")


def prepare(args: argparse.Namespace) -> dict:
    """Runs (or resumes) a preparation; returns the manifest."""
    try:
        paths = sources.expand_glob(args.input, "--input")
    except FileNotFoundError as e:
        raise PrepareError(f"--input={args.input!r} matches no files; check the glob.") from e
    fmt = args.format
    if fmt == "auto":
        formats = {_format_of(p) for p in paths}
        if len(formats) > 1:
            raise PrepareError(f"--input matches files of several formats {sorted(formats)};"
                               " set --format or narrow --input.")
        fmt = formats.pop()
    try:
        tokenizer = tokenizer_lib.Tokenizer(args.tokenizer)
    except (FileNotFoundError, RuntimeError) as e:
        raise PrepareError(f"--tokenizer={args.tokenizer!r}: {e}") from e
    output = args.output
    identity = {"input": args.input, "format": fmt, "jsonl_field": args.jsonl_field,
                "shard_documents": args.shard_documents, "tokenizer_sha256": tokenizer.sha256(),
                "sources": [{"path": p, "bytes": os.path.getsize(p)} for p in paths]}
    _check_previous_run(output, identity)
    os.makedirs(os.path.join(output, PROGRESS_DIR), exist_ok=True)
    if not os.path.exists(os.path.join(output, ARGS_FILE)):
        _replace_atomically(os.path.join(output, ARGS_FILE),
                            json.dumps(identity, indent=1, sort_keys=True).encode())

    for folder in (output, os.path.join(output, PROGRESS_DIR)):  # leftovers of a killed run: ours, redone below
        for name in os.listdir(folder):
            if name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
    units = _units(paths, fmt, args.shard_documents)
    todo = [(k, unit, fmt, args.jsonl_field, args.shard_documents, output)
            for k, unit in enumerate(units) if not os.path.exists(_unit_file(output, k))]
    with tqdm(total=len(units), initial=len(units) - len(todo), unit="unit",
              desc="prepare", file=sys.stderr) as progress:
        if args.workers == 1 or len(todo) <= 1:
            for task in todo:
                prepare_unit(*task, tokenizer=tokenizer)
                progress.update()
        else:
            # spawn: callers (tests, notebooks) may hold JAX threads that fork would copy.
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(args.workers, len(todo)), _init_worker, (tokenizer,)) as pool:
                for _ in pool.imap_unordered(_run_unit, todo):
                    progress.update()

    manifest = _manifest(output, identity, tokenizer, len(units))
    _replace_atomically(os.path.join(output, sources.MANIFEST_NAME),
                        json.dumps(manifest, indent=1).encode())
    return manifest


def _manifest(output: str, identity: dict, tokenizer: tokenizer_lib.Tokenizer,
              num_units: int) -> dict:
    shards, stats = [], dict.fromkeys(_STAT_KEYS, 0)
    for k in range(num_units):
        with open(_unit_file(output, k)) as f:
            summary = json.load(f)
        shards += summary["shards"]
        for key in _STAT_KEYS:
            stats[key] += summary["stats"][key]
    return {
        "format_version": 1,
        "record": "one document: int32 little-endian token ids, EOS last",
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "tokenizer": {"path": os.path.abspath(tokenizer.model_path),
                      "sha256": tokenizer.sha256(), "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id},
        "arguments": {k: identity[k] for k in ("input", "format", "jsonl_field", "shard_documents")},
        "sources": identity["sources"],
        "input_stats": dict(stats, long_document_tokens=LONG_DOCUMENT_TOKENS),
        "shards": shards,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = prepare(args)
    except (PrepareError, KeyError, ValueError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"prepare: {manifest['documents']} documents, {manifest['tokens']} tokens in"
          f" {len(manifest['shards'])} shards -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
