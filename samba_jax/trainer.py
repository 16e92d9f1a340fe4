"""Train state, optimizer, the jit-compiled train and eval steps.

The state is a plain pytree `{"step", "params", "opt_state", "skips"}`; `train_step` is a pure
function of (state, tokens) with gradient accumulation as a `lax.scan` over micro-batches, so the
global batch of the recipe (512 x 4096 tokens) holds on any number of devices. A step whose loss or
gradient norm is not finite leaves params and optimizer state untouched and is counted in
`state["skips"]` on the device, so the loop learns of it without a host sync every step. The loop
that drives these lives in `samba_jax/train_loop.py`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from samba_jax.config import ModelConfig
from samba_jax.model.chunked_loss import auto_chunks, chunked_cross_entropy
from samba_jax.model.samba import SambaLM, head_matrix

State = dict[str, Any]


def make_optimizer(opt: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW as the reference: clip 1.0, decay on all parameters, linear warm-up then cosine to lr*min_ratio."""
    warmup = int(round(opt.warmup_fraction * num_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=opt.learning_rate * opt.min_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
    )
    return tx, schedule


def init_skips() -> dict[str, jax.Array]:
    """Counters of skipped (non-finite) steps: the current run, the step it started at, the total."""
    # Three distinct buffers: the state is donated, and one buffer may not be donated twice.
    return {name: jnp.zeros((), jnp.int32) for name in ("consecutive", "run_start", "total")}


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array) -> State:
    """Float32 parameters (reference init), fresh optimizer state and zeroed skip counters."""
    params = nn.unbox(SambaLM(model_cfg).init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "skips": init_skips()}


def abstract_boxed_state(model_cfg: ModelConfig, tx: optax.GradientTransformation) -> State:
    """Shapes of the state with parameters (and the optimizer moments mirroring them) still in flax's
    `Partitioned` boxes, whose logical axis names give the shardings (`sharding.state_shardings`)."""
    def init():
        params = SambaLM(model_cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "skips": init_skips()}

    return jax.eval_shape(init)


def init_state_on_mesh(model_cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array,
                       shardings: Any) -> State:
    """`init_state` compiled with the state's shardings: each device creates only its shards.
    (Random bits are sharding-independent, so the values equal the single-device init.)"""
    return jax.jit(lambda key: init_state(model_cfg, tx, key), out_shardings=shardings)(rng)


def next_token_loss(model: SambaLM, params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and token count. tokens: (batch, seq + 1) int32.

    The head and softmax run in `model.cfg.loss_chunks` groups of positions (0: as many as keep
    one group's logits under 4 GiB), so long sequences never hold the whole logits tensor.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    cfg = model.cfg
    chunks = cfg.loss_chunks or auto_chunks(*inputs.shape, cfg.vocab_size)
    count = jnp.asarray(targets.size, jnp.float32)
    if chunks == 1:
        logits = model.apply({"params": params}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum(), count
    hidden = model.apply({"params": params}, inputs, return_hidden=True)
    total = chunked_cross_entropy(hidden, head_matrix(cfg, params), targets, chunks, jnp.dtype(cfg.compute_dtype))
    return total, count


def update_skips(skips: dict[str, jax.Array], skipped: jax.Array, step: jax.Array,
                 max_consecutive: int) -> dict[str, jax.Array]:
    """Advances the skip counters by one step (`skipped`: bool scalar; `step`: its logged number).

    Once a run of skipped steps reaches `max_consecutive` (> 0) the counters freeze, so the loop,
    which only looks every few steps, still sees the run (and where it started) even if good steps
    followed it.
    """
    tripped = (skips["consecutive"] >= max_consecutive) if max_consecutive > 0 else jnp.bool_(False)
    skipped_i = skipped.astype(jnp.int32)
    new = {
        "consecutive": jnp.where(skipped, skips["consecutive"] + 1, 0),
        "run_start": jnp.where(skipped & (skips["consecutive"] == 0), step, skips["run_start"]),
        "total": skips["total"] + skipped_i,
    }
    return jax.tree.map(lambda old, upd: jnp.where(tripped, old, upd), skips, new)


def on_mesh(fn: Callable, mesh: Any, rule_table: Any) -> Callable:
    """Runs (and so traces) `fn` with `mesh` and the logical-axis rules active."""
    def run(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
            return fn(*args)

    return run


def make_train_step(model: SambaLM, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
                    max_consecutive_bad: int = 0, mesh: Any = None, rule_table: Any = None,
                    state_sharding: Any = None, batch_sharding: Any = None,
                    ) -> Callable[[State, jax.Array], tuple[State, dict[str, jax.Array]]]:
    """Returns the jitted step. tokens: (accum_steps, micro_batch, seq + 1); the state is donated.

    loss_fn: (params, tokens (batch, seq + 1)) -> (summed loss, token count); defaults to the
    next-token cross-entropy of `model` (tests pass one that goes NaN on purpose).
    max_consecutive_bad: the skip-run length at which `state["skips"]` freezes (0: never).
    mesh, rule_table, state_sharding, batch_sharding: for a sharded step (see samba_jax.sharding);
    the step keeps the state's shardings, so parameters and optimizer state stay where they live.
    """
    def mean_loss(params, tokens):
        total, count = (loss_fn or partial(next_token_loss, model))(params, tokens)
        return total / count

    def train_step(state: State, tokens: jax.Array):
        params = state["params"]
        grad_fn = jax.value_and_grad(mean_loss)
        if tokens.shape[0] == 1:
            loss, grads = grad_fn(params, tokens[0])
        else:
            def accumulate(carry, micro_tokens):
                loss_sum, grad_sum = carry
                loss, grads = grad_fn(params, micro_tokens)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), tokens)
            # Micro-batches are equal-sized, so the mean of means is the global token mean.
            loss = loss_sum / tokens.shape[0]
            grads = jax.tree.map(lambda g: g / tokens.shape[0], grad_sum)
        grad_norm = optax.tree.norm(grads)
        # One NaN/Inf anywhere makes the global norm non-finite, so this scalar test covers every leaf.
        skipped = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        def keep(old, new):  # a select, not arithmetic, so NaN in the rejected update cannot leak
            return jnp.where(skipped, old, new)

        skips = update_skips(state["skips"], skipped, state["step"] + 1, max_consecutive_bad)
        new_state = {"step": state["step"] + 1, "params": jax.tree.map(keep, params, new_params),
                     "opt_state": jax.tree.map(keep, state["opt_state"], opt_state), "skips": skips}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "skipped": skipped.astype(jnp.int32), "skipped_steps": skips["total"],
                   "consecutive_skipped": skips["consecutive"], "skip_run_start": skips["run_start"]}
        return new_state, metrics

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    return on_mesh(jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                           out_shardings=(state_sharding, None), donate_argnums=0), mesh, rule_table)


def make_eval_step(model: SambaLM, mesh: Any = None, rule_table: Any = None
                   ) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """Returns jitted (params, tokens (batch, seq + 1)) -> (summed loss, token count)."""
    step = jax.jit(lambda params, tokens: next_token_loss(model, params, tokens))
    return step if mesh is None else on_mesh(step, mesh, rule_table)


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient; the run stops."""


def check_skips(fetched: dict[str, float], step: int, limit: int, last_checkpoint: str) -> None:
    """Raises NonFiniteError if the device-side skip counters (fetched metrics) reached `limit` (> 0)."""
    if limit <= 0 or fetched["consecutive_skipped"] < limit:
        return
    first = int(fetched["skip_run_start"])
    raise NonFiniteError(
        f"Steps {first}..{first + limit - 1}: {limit} consecutive steps had a non-finite loss or gradient "
        f"norm and were skipped (max_consecutive_bad_steps={limit}); stopped at step {step}. The last good "
        f"checkpoint is {last_checkpoint}; rerunning resumes from it. Likely fixes: lower "
        f"--config.optimizer.learning_rate or lengthen warmup_fraction; use "
        f"--config.model.compute_dtype=float32 if bfloat16 overflows; check the data around those steps; "
        f"--config.max_consecutive_bad_steps=0 only skips and never stops.")
