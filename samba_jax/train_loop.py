"""The training loop: data -> model -> optimizer -> steps, with eval, metrics and checkpoints.

Reads top to bottom like a big_vision trainer; the pieces live in small modules (`trainer`,
`checkpoint`, `metrics`, `data`). Rerunning the same command resumes from the newest checkpoint
in the workdir; SIGTERM, Ctrl-C or a multi-host preemption notice finishes the current step,
saves, and exits with 128 + SIGTERM/SIGINT. Steps with a non-finite loss or gradient are skipped
on the device (see `trainer`); a run of `max_consecutive_bad_steps` of them stops the run.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from samba_jax import checkpoint, metrics, sharding
from samba_jax.config import ConfigError, ConfigFileError, ModelConfig, flops_per_token, parameter_count, validate_run
from samba_jax.data import pipeline
from samba_jax.model.samba import SambaLM
from samba_jax.trainer import (
    abstract_boxed_state,
    check_skips,
    init_state_on_mesh,
    make_eval_step,
    make_optimizer,
    make_train_step,
)


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag checked between steps (save, then exit)."""

    def __init__(self, sigterm: bool = True):
        self.signum = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT) if sigterm else (signal.SIGINT,):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.signum = signum
        metrics.log(f"Received signal {signum}: finishing this step, saving, then exiting.")

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def write_config(config: Any, workdir: str, step: int) -> None:
    """Writes the resolved config as config.json; a different earlier one is kept, never overwritten."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
        path = os.path.join(workdir, f"config.resumed_at_step_{step}.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def eval_lengths(config: Any) -> list[int]:
    """config.eval_lengths ("4096,8192,16384": validation also at these lengths; "" none) as ints."""
    value = config.get("eval_lengths", "") or ""
    text = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value).strip("()[] ")
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"config.eval_lengths={text!r} is not a list of lengths. Fix: e.g. "
                          f"--config.eval_lengths=4096,8192,16384.") from None
    if any(length < 1 for length in lengths):
        raise ConfigError(f"config.eval_lengths={text!r}: lengths must be positive.")
    return lengths


def evaluate_all(eval_step, params, make_eval_iter, lengths, to_global) -> dict[str, float]:
    """The validation loss at the training length, and `eval_loss@L` for each L of eval_lengths."""
    out = evaluate(eval_step, params, make_eval_iter, to_global)
    for length in lengths:
        ev = evaluate(eval_step, params, lambda length=length: make_eval_iter(length), to_global)
        if ev:
            out[f"eval_loss@{length}"] = ev["eval_loss"]
    return out


def evaluate(eval_step, params, make_eval_iter, to_global=lambda x: x) -> dict[str, float]:
    """Mean next-token loss and perplexity over the (fixed) validation batches."""
    total, count = 0.0, 0.0
    for batch in make_eval_iter():
        loss_sum, n = eval_step(params, to_global(np.asarray(batch["tokens"])))
        total, count = total + float(loss_sum), count + float(n)
    if count == 0:
        return {}
    loss = total / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def make_data(config: Any, workdir: str, model_cfg: ModelConfig):
    """The tokenizer (trained on the default corpus on first use) and the grain iterators.

    Returns (train iterator, a function making a fresh eval iterator, the eval source or "").
    A data problem (a glob matching nothing, a tokenizer mismatch, a bad JSONL field) surfaces as
    a ConfigError before anything compiles.
    """
    seq_len, pcount = config.data.seq_len, jax.process_count()
    try:
        tokenizer = pipeline.get_tokenizer(config.data.source, config.data.tokenizer, workdir, model_cfg.vocab_size)
        if tokenizer.vocab_size != model_cfg.vocab_size:
            raise ConfigError(f"config.model.vocab_size={model_cfg.vocab_size} differs from the tokenizer's "
                              f"vocabulary ({tokenizer.vocab_size}, {config.data.tokenizer or 'default'}). "
                              f"Fix: set --config.model.vocab_size={tokenizer.vocab_size}.")
        # make_dataset also checks that prepared (array_record) data was tokenized with this tokenizer.
        source_options = dict(jsonl_field=config.data.jsonl_field, tfds_data_dir=config.data.tfds_data_dir or None,
                              tfds_text_feature=config.data.tfds_text_feature)
        # Validation: data.eval_source, else the source's own split ("stdlib"), else documents held out of
        # the training source (data/holdout.py), else none (data.holdout_permille=0), said in the log.
        holdout = 0 if config.data.eval_source or config.data.source == "stdlib" else config.data.holdout_permille
        eval_source = config.data.eval_source or (config.data.source if config.data.source == "stdlib" or holdout
                                                  else "")
        train_iter = iter(pipeline.make_dataset(
            config.data.source, tokenizer, seq_len, config.batch_size // pcount, seed=config.seed, split="train",
            worker_count=config.data.worker_count, holdout_permille=holdout, **source_options))
        if eval_source and eval_source != config.data.source:
            pipeline.check_source(eval_source, tokenizer)
        if holdout:
            metrics.log(f"Validation: {holdout} in 1000 documents of {config.data.source} held out of training "
                        f"(data.holdout_permille; set data.eval_source to use other documents).")
        elif not eval_source:
            metrics.log("Validation: none (data.holdout_permille=0 and no data.eval_source).")
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise (ConfigFileError if isinstance(e, FileNotFoundError) else ConfigError)(f"config.data: {e}") from e

    def make_eval_iter(length: int = seq_len):
        # Fixed batches: unshuffled, repeated so every process takes exactly eval_steps batches. At
        # another length (eval_lengths) a batch holds about as many tokens as a micro-batch.
        rows = max(1, config.micro_batch_size * seq_len // length // pcount)
        return iter(pipeline.make_dataset(
            eval_source, tokenizer, length, rows, seed=config.seed, split="validation", shuffle=False, repeat=True,
            max_batches=config.eval_steps, holdout_permille=holdout, **source_options))

    return train_iter, make_eval_iter, eval_source


def train_and_evaluate(config: Any, workdir: str, stop_after_steps: int = 0) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last metrics.

    stop_after_steps: if positive, save and return after this many steps of this invocation (to
    fit a job's time limit); rerunning continues exactly where it stopped.
    """
    model_cfg = ModelConfig.from_config(config.model)
    validate_run(config, model_cfg)
    lengths = eval_lengths(config)
    seq_len, pcount = config.data.seq_len, jax.process_count()
    sharding.check_model_fits_mesh(model_cfg, sharding.mesh_shape(config.mesh, jax.device_count()), seq_len,
                                   config.micro_batch_size)
    accum = config.batch_size // config.micro_batch_size

    train_iter, make_eval_iter, eval_source = make_data(config, workdir, model_cfg)

    # Mesh and shardings: parameters and optimizer state split by their logical axes (sharding.py).
    mesh, rule_table = sharding.make_mesh(config.mesh), sharding.rules(config)
    model = SambaLM(model_cfg)
    tx, schedule = make_optimizer(config.optimizer, config.num_train_steps)
    state_shardings = sharding.state_shardings(abstract_boxed_state(model_cfg, tx), mesh, rule_table)
    tokens_sharding = sharding.batch_sharding(mesh, rule_table)  # (accum, micro_batch, seq + 1)
    eval_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*tokens_sharding.spec[1:]))

    def to_global(local_tokens, target=tokens_sharding):  # this process's rows -> one global array
        return jax.make_array_from_process_local_data(target, local_tokens)

    # State: restored if the workdir holds a checkpoint (onto this mesh, whatever mesh saved it).
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  nn.unbox(abstract_boxed_state(model_cfg, tx)), state_shardings)
    manager = checkpoint.make_manager(workdir, config.checkpoint_every_steps, config.keep_checkpoints,
                                      config.async_checkpointing)
    restored = checkpoint.restore_latest(manager, abstract_state, train_iter, config.checkpoint_fail_on_damage)
    if restored is None:
        state, start = init_state_on_mesh(model_cfg, tx, jax.random.key(config.seed), state_shardings), 0
    else:
        start, state = restored
        metrics.log(f"Resumed from checkpoint at step {start} in {workdir}/checkpoints.")
        if start >= config.num_train_steps:
            metrics.log(f"Nothing to do: step {start} >= num_train_steps={config.num_train_steps}; raise "
                        f"--config.num_train_steps to train further.")
    write_config(config, workdir, start)

    counts = parameter_count(model_cfg)
    flops = flops_per_token(model_cfg, seq_len)
    metrics.log(f"Model: {counts['total'] / 1e6:.2f}M parameters, {flops['train'] / 1e9:.3f} GFLOP/token "
                f"(train, MaxText convention + scan), compute dtype {model_cfg.compute_dtype}, "
                f"{jax.device_count()} x {jax.devices()[0].device_kind} in {pcount} process(es), mesh "
                f"{dict(mesh.shape)}; batch {config.batch_size} x {seq_len} in {accum} micro-batches of "
                f"{config.micro_batch_size}.")

    train_step = make_train_step(model, tx, schedule, max_consecutive_bad=config.max_consecutive_bad_steps,
                                 mesh=mesh, rule_table=rule_table, state_sharding=state_shardings,
                                 batch_sharding=tokens_sharding)
    eval_step = make_eval_step(model, mesh, rule_table)
    eval_global = lambda x: to_global(x, eval_sharding)  # noqa: E731
    writer = metrics.MetricWriter(workdir)
    throughput = metrics.Throughput(config.batch_size * seq_len, flops["train"], config.num_train_steps)
    # Multi-host: SIGTERM is left to JAX's preemption service, which `reached_preemption` turns into
    # one agreed step on every host; a handler of ours would shadow it.
    stop = StopRequested(sigterm=pcount == 1)
    last: dict[str, float] = {}
    step, preempted = start, False
    def eval_line(step, ev):
        at = "".join(f" eval_loss@{k.split('@')[1]} {v:.4f}" for k, v in ev.items() if "@" in k)
        return f"step {step} eval_loss {ev['eval_loss']:.4f} perplexity {ev['eval_perplexity']:.2f}{at}"

    if start == 0 and eval_source:  # the loss before training, so the first curve point is the init
        ev = evaluate_all(eval_step, state["params"], make_eval_iter, lengths, eval_global)
        metrics.log(eval_line(0, ev))
        writer.write(0, ev)
    try:
        while step < config.num_train_steps:
            tokens = to_global(np.asarray(next(train_iter)["tokens"]).reshape(accum, -1, seq_len + 1))
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = train_step(state, tokens)
            step += 1
            throughput.tick()
            preempted = preempted or manager.reached_preemption(step)  # every step, as orbax requires
            stopping = (stop.signum is not None or preempted or step == config.num_train_steps
                        or step - start == stop_after_steps)
            saving = stopping or step % config.checkpoint_every_steps == 0
            if step % config.log_every_steps == 0 or stopping:
                record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                check_skips(record, step, config.max_consecutive_bad_steps, checkpoint.describe_latest(manager))
                for key in ("consecutive_skipped", "skip_run_start"):  # kept for the check, not the curves
                    record.pop(key)
                record.update(throughput.report(step))
                skipped_note = f" skipped_steps {int(record['skipped_steps'])}" if record["skipped_steps"] else ""
                metrics.log(metrics.format_line(step, config.num_train_steps, record) + skipped_note)
                writer.write(step, record)
                last = record
            elif saving:  # never save a state whose skip run already reached the limit
                counters = {k: float(step_metrics[k]) for k in ("consecutive_skipped", "skip_run_start")}
                check_skips(counters, step, config.max_consecutive_bad_steps, checkpoint.describe_latest(manager))
            if step % config.eval_every_steps == 0 or step == config.num_train_steps:
                with throughput.pause(state):
                    if eval_source:
                        ev = evaluate_all(eval_step, state["params"], make_eval_iter, lengths, eval_global)
                        if ev:
                            metrics.log(eval_line(step, ev))
                            writer.write(step, ev)
                            last.update(ev)
            if saving:
                with throughput.pause(state):
                    checkpoint.save(manager, step, state, train_iter, force=stopping)
            if stopping:
                break
    finally:
        stop.restore()
        manager.wait_until_finished()
        manager.close()
        writer.close()
    if stop.signum is not None or preempted:
        signum = stop.signum or signal.SIGTERM
        metrics.log(f"Saved step {step} after {'signal ' + str(signum) if stop.signum else 'a preemption notice'}; "
                    f"rerun the same command to resume.")
        raise SystemExit(128 + signum)
    return last
