"""`python -m samba_jax.evaluate TASK --checkpoint=PATH --output=DIR [flags]`.

Tasks:
  perplexity  per-position loss of long documents (--mode=streaming|prefix|stride); perplexity.json,
              perplexity.png, and with --save_tokens tokens.npz (tokens (rows, L + 1) int32, nll
              (rows, L) float32)
  plot        several perplexity.json files on one chart: --inputs=a.json,b.json --output=DIR

Nothing is overwritten: a taken result name becomes NAME-2.json, NAME-3.json, ...
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags, logging

from samba_jax.config import ConfigError

TASKS = ("perplexity", "plot")

flags.DEFINE_string("checkpoint", None, "A training workdir or an export (anything samba_jax.load reads).")
flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the newest).")
flags.DEFINE_string("tokenizer", "", "SentencePiece .model (default: the workdir's own).")
flags.DEFINE_string("output", None, "Directory for the results (created; nothing in it is overwritten).")
flags.DEFINE_string("label", "", "Name of this model in plots (default: the output directory's name).")
flags.DEFINE_string("data", "stdlib", "Evaluation text: any training source spec (stdlib, text:, jsonl:, "
                    "array_record:, tfds:).")
flags.DEFINE_string("split", "validation", "Split of --data (stdlib and split-less tfds: sources).")
flags.DEFINE_string("jsonl_field", "text", "Text field of jsonl: sources.")
flags.DEFINE_enum("mode", "streaming", ["streaming", "prefix", "stride"], "perplexity: how to score.")
flags.DEFINE_integer("max_length", 16384, "streaming/stride: tokens scored per row.")
flags.DEFINE_integer("chunk", 4096, "streaming: tokens per forward pass (the state carries across).")
flags.DEFINE_integer("rows", 4, "streaming/stride: documents (or stream pieces) scored.")
flags.DEFINE_bool("concat_documents", False, "Join documents (EOS between) into one stream cut into rows.")
flags.DEFINE_bool("save_tokens", False, "Also write tokens.npz with every token and its loss.")
flags.DEFINE_list("lengths", ["4096", "8192", "16384"], "prefix: the lengths L.")
flags.DEFINE_integer("batch", 1, "prefix: rows per forward pass.")
flags.DEFINE_integer("batches", 8, "prefix: batches averaged.")
flags.DEFINE_integer("window", 4096, "stride: window length.")
flags.DEFINE_integer("stride", 2048, "stride: tokens each window adds.")
flags.DEFINE_list("inputs", [], "plot: result files.")


def _perplexity(f) -> dict:
    from samba_jax.evaluate import loading, perplexity, plot, results

    loaded = loading.load_model(f.checkpoint, f.tokenizer, f.step)
    out = {"task": "perplexity", "mode": f.mode, "label": f.label, "checkpoint": loaded.description,
           "model": {"pattern": list(loaded.cfg.pattern), "num_repeats": loaded.cfg.num_repeats,
                     "window": loaded.cfg.window, "d_model": loaded.cfg.d_model},
           "context": results.run_context()}
    if f.mode == "prefix":
        tok = loading.need_tokenizer(loaded, "perplexity --mode=prefix")
        lengths = sorted(int(x) for x in f.lengths)
        out["data"] = {"source": f.data, "split": "validation", "batch": f.batch, "batches": f.batches}
        out["prefix"] = perplexity.prefix(loaded.cfg, loaded.params, f.data, tok, lengths, f.batch, f.batches,
                                          f.jsonl_field)
        for L, r in out["prefix"].items():
            print(f"L={L}: loss {r['mean_nll']:.4f} perplexity {r['perplexity']:.2f}")
    else:
        rows, info = loading.long_rows(f.data, f.split, loaded.tokenizer, f.max_length, f.rows, f.concat_documents,
                                       f.jsonl_field)
        out["data"] = info
        out["max_length"] = f.max_length
        if f.mode == "streaming":
            out["chunk"] = f.chunk
            out["memory_check"] = perplexity.check_fits(loaded.cfg, loaded.params, rows.shape[0], f.max_length,
                                                        f.chunk)
            nll, timing = perplexity.stream(loaded.cfg, loaded.params, rows, f.chunk)
        else:
            nll, timing = perplexity.stride(loaded.cfg, loaded.params, rows, f.window, f.stride)
        out["timing"] = timing
        out["peak_device_memory_bytes"] = results.peak_memory_bytes()
        out["summary"] = perplexity.summarize(nll)
        s = out["summary"]
        print(f"{rows.shape[0]} rows x {f.max_length:,} tokens ({f.mode}): perplexity {s['perplexity']:.3f}, "
              f"{timing['tokens_per_second']:,.0f} tokens/s")
        for b in s["buckets"]:
            print(f"  positions [{b['from']:>9,}, {b['to']:>9,}): mean NLL {b['mean_nll']:.4f}   "
                  f"perplexity of the first {b['to']:,}: {s['cumulative_perplexity'][str(b['to'])]:.3f}")
        if f.save_tokens:
            path = results.free_path(f.output, "tokens.npz")
            np.savez_compressed(path, tokens=rows, nll=nll)
            out["tokens_file"] = path
    path = results.write_json(f.output, "perplexity.json", out)
    png = plot.perplexity_curves([path], results.free_path(f.output, "perplexity.png"))
    print(f"wrote {path}" + (f" and {png}" if png else " (no PNG: pip install -e '.[eval]' for matplotlib)"))
    return out


def _plot(f) -> None:
    from samba_jax.evaluate import plot, results

    if not f.inputs:
        raise ConfigError("plot needs --inputs=a/perplexity.json,b/perplexity.json.")
    png = plot.perplexity_curves(f.inputs, results.free_path(f.output, "perplexity_curves.png"))
    if png is None:
        raise ConfigError("plot needs matplotlib. Fix: pip install -e '.[eval]'.")
    print(f"wrote {png}")


def main(argv):
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    task = argv[1] if len(argv) > 1 else ""
    try:
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}. Fix: python -m samba_jax.evaluate {{{'|'.join(TASKS)}}} ...")
        if len(argv) > 2:
            raise ConfigError(f"unexpected arguments {argv[2:]}; flags are --name=value.")
        if not f.output:
            raise ConfigError("--output=DIR is required (results are written there).")
        if task == "plot":
            _plot(f)
        else:
            if not f.checkpoint:
                raise ConfigError("--checkpoint=PATH is required (a training workdir or an export).")
            _perplexity(f)
    except ConfigError as e:
        print(f"ERROR ({type(e).__name__}): {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
