"""Train step: gradient accumulation, the optimizer recipe, loss falling, non-finite steps skipped."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from samba_jax.config import ModelConfig
from samba_jax.configs.base import base_config
from samba_jax.model.samba import SambaLM
from samba_jax.trainer import (
    NonFiniteError,
    check_skips,
    init_skips,
    init_state,
    make_optimizer,
    make_train_step,
    next_token_loss,
    update_skips,
)

CFG = ModelConfig(vocab_size=64, d_model=32, num_repeats=1, num_heads=2, num_kv_heads=1, head_dim=16,
                  window=6, mlp_hidden=48, ssm_state=4, scan_chunk=8)


def _optimizer(steps=100, lr=1e-2):
    opt = base_config().optimizer
    opt.learning_rate = lr
    return make_optimizer(opt, steps)


def test_gradient_accumulation_equals_one_big_batch():
    tx, schedule = _optimizer()
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 17)).astype(np.int32)
    step = make_train_step(SambaLM(CFG), tx, schedule)
    full, m_full = step(init_state(CFG, tx, jax.random.key(0)), tokens.reshape(1, 4, 17))
    accum, m_accum = step(init_state(CFG, tx, jax.random.key(0)), tokens.reshape(2, 2, 17))
    np.testing.assert_allclose(m_full["loss"], m_accum["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_full["grad_norm"], m_accum["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), full["params"],
                 accum["params"])
    assert int(full["step"]) == 1


def test_schedule_warms_up_from_zero_then_cosine_to_a_tenth():
    _, schedule = _optimizer(steps=1000, lr=4e-4)  # warm-up 1% = 10 steps
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(2e-4)
    assert float(schedule(10)) == pytest.approx(4e-4)
    assert float(schedule(505)) == pytest.approx(4e-5 + (4e-4 - 4e-5) / 2, rel=1e-3)
    assert float(schedule(1000)) == pytest.approx(4e-5)


def test_weight_decay_applies_to_every_parameter_as_the_reference():
    tx, _ = _optimizer()
    params = init_state(CFG, tx, jax.random.key(0))["params"]
    opt_state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):  # step 0 has lr 0; later steps decay params toward 0 with zero gradients
        updates, opt_state = tx.update(zeros, opt_state, params)
    for (path, p), u in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(updates)):
        p, u = np.asarray(p), np.asarray(u)
        nonzero = np.asarray(p) != 0
        assert np.all(np.sign(u[nonzero]) == -np.sign(p[nonzero])), path  # norms, A_log, D, biases too


def test_loss_falls_on_repeated_batches():
    tx, schedule = _optimizer(steps=30, lr=1e-2)
    step = make_train_step(SambaLM(CFG), tx, schedule)
    state = init_state(CFG, tx, jax.random.key(0))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (1, 4, 33)).astype(np.int32)
    losses = []
    for _ in range(30):
        state, m = step(state, tokens)
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(np.log(CFG.vocab_size), abs=0.3)  # near-uniform predictions at init
    assert losses[-1] < losses[0] - 1.0


def test_config_override_fields_exist():
    c = base_config()
    assert isinstance(c, ml_collections.ConfigDict)
    for name in ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "seed"):
        assert name in c
    assert c.seed == 3407 and c.batch_size * c.data.seq_len == 512 * 4096
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay) == (0.9, 0.95, 0.1)


def _nan_if_negative(model):
    """A loss that is NaN (value and gradients) for batches holding a negative token: a fault on demand."""
    def loss_fn(params, tokens):
        total, count = next_token_loss(model, params, jnp.maximum(tokens, 0))
        return total * jnp.where(jnp.any(tokens < 0), jnp.nan, 1.0), count
    return loss_fn


def test_nonfinite_steps_leave_params_and_optimizer_state_bit_identical():
    tx, schedule = _optimizer()
    model = SambaLM(CFG)
    step = make_train_step(model, tx, schedule, loss_fn=_nan_if_negative(model))
    state = init_state(CFG, tx, jax.random.key(0))
    good = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 2, 17)).astype(np.int32)
    bad = good.copy()
    bad[1, 0, 3] = -1  # one micro-batch of the accumulation goes bad
    state, m = step(state, good)
    assert int(m["skipped"]) == 0
    before = jax.tree.map(np.asarray, state)
    skipped_flags = []
    for _ in range(2):
        state, m = step(state, bad)
        skipped_flags.append(int(m["skipped"]))
    assert skipped_flags == [1, 1] and not np.isfinite(float(m["loss"]))
    after = jax.tree.map(np.asarray, state)
    for key in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, before[key], after[key])  # bitwise, NaN-free
    assert int(after["step"]) == 3  # the step counter (hence the data stream) moves on
    assert {k: int(v) for k, v in after["skips"].items()} == {"consecutive": 2, "run_start": 2, "total": 2}
    state, m = step(state, good)  # training continues after the bad steps
    assert int(m["skipped"]) == 0 and int(m["consecutive_skipped"]) == 0 and int(m["skipped_steps"]) == 2
    assert not np.array_equal(np.asarray(state["params"]["embed"]["embedding"]),
                              before["params"]["embed"]["embedding"])


def test_finite_loss_with_nonfinite_gradient_is_skipped():
    tx, schedule = _optimizer()
    model = SambaLM(CFG)

    def loss_fn(params, tokens):  # value unchanged, gradient of sqrt at 0 is infinite
        total, count = next_token_loss(model, params, tokens)
        w = params["embed"]["embedding"][0, 0]
        return total + jnp.sqrt(jnp.abs(w - jax.lax.stop_gradient(w))), count

    step = make_train_step(model, tx, schedule, loss_fn=loss_fn)
    state = init_state(CFG, tx, jax.random.key(0))
    before = np.asarray(state["params"]["embed"]["embedding"])
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (1, 2, 17)).astype(np.int32)
    state, m = step(state, tokens)
    assert np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"]))
    assert int(m["skipped"]) == 1
    np.testing.assert_array_equal(before, np.asarray(state["params"]["embed"]["embedding"]))


def test_skip_counters_freeze_once_the_limit_is_reached_and_the_check_names_the_run():
    skips = init_skips()
    for n, bad in enumerate([True, False, True, True, True, False, False], start=1):
        skips = update_skips(skips, jnp.bool_(bad), jnp.int32(n), max_consecutive=3)
    # Steps 3, 4, 5 tripped the limit; the good steps 6 and 7 after it do not hide the run.
    assert {k: int(v) for k, v in skips.items()} == {"consecutive": 3, "run_start": 3, "total": 4}
    fetched = {"consecutive_skipped": 3.0, "skip_run_start": 3.0}
    with pytest.raises(NonFiniteError, match=r"Steps 3\.\.5: 3 consecutive .* stopped at step 7\. The last good "
                                             r"checkpoint is /ckpt/2 \(step 2\).*learning_rate"):
        check_skips(fetched, 7, 3, "/ckpt/2 (step 2)")
    check_skips(fetched, 7, 0, "")  # 0 disables the stop
    check_skips(fetched, 7, 4, "")
