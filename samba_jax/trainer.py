"""Train state, optimizer, the jit-compiled train and eval steps.

The state is a plain pytree `{"step", "params", "opt_state"}`; `train_step` is a pure function
of (state, tokens) with gradient accumulation as a `lax.scan` over micro-batches, so the global
batch of the recipe (512 x 4096 tokens) holds on any number of devices. The loop that drives
these lives in `samba_jax/train_loop.py`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from samba_jax.config import ModelConfig
from samba_jax.model.samba import SambaLM

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


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array) -> State:
    """Float32 parameters (reference init) and fresh optimizer state."""
    params = nn.unbox(SambaLM(model_cfg).init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def next_token_loss(model: SambaLM, params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and token count. tokens: (batch, seq + 1) int32."""
    logits = model.apply({"params": params}, tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)


def make_train_step(model: SambaLM, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    ) -> Callable[[State, jax.Array], tuple[State, dict[str, jax.Array]]]:
    """Returns the jitted step. tokens: (accum_steps, micro_batch, seq + 1); the state is donated."""

    def mean_loss(params, tokens):
        total, count = next_token_loss(model, params, tokens)
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
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model: SambaLM) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """Returns jitted (params, tokens (batch, seq + 1)) -> (summed loss, token count)."""
    return jax.jit(lambda params, tokens: next_token_loss(model, params, tokens))
