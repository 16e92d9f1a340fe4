"""Tests for samba_jax.ops.attention: banded vs. the dense oracle, the oracle vs. a numpy loop,
causality and window reach, no seq x seq tensor in the banded jaxpr, ring-buffer decode, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samba_jax.ops.attention import sliding_window_attention, sliding_window_attention_decode


def _inputs(seed, batch, seq, q_heads, kv_heads, head_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, q_heads, head_dim))
    k = rng.standard_normal((batch, seq, kv_heads, head_dim))
    v = rng.standard_normal((batch, seq, kv_heads, head_dim))
    ct = rng.standard_normal((batch, seq, q_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, ct))


@functools.partial(jax.jit, static_argnames=("window", "impl", "block"))
def _out_and_grads(q, k, v, ct, window, impl, block):
    def fn(q, k, v):
        return sliding_window_attention(q, k, v, window, implementation=impl, block_size=block)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct)


_ATTN = jax.jit(sliding_window_attention, static_argnames=("window", "implementation", "block_size"))

# (seq, block, q_heads, kv_heads, window): windows 1, small, = block, between blocks, seq-1, seq,
# > seq, None; GQA ratios 1, 2, 4; seq not a multiple of the block; seq shorter than one block.
CASES = [
    (50, 16, 4, 2, 1),
    (50, 16, 4, 2, 17),
    (50, 16, 4, 2, 16),
    (50, 16, 4, 2, 33),
    (50, 16, 4, 2, 49),
    (50, 16, 4, 2, 50),
    (50, 16, 4, 2, 80),
    (50, 16, 4, 2, None),
    (50, 16, 2, 2, 17),
    (50, 16, 4, 1, 17),
    (50, 16, 4, 4, None),
    (50, 16, 8, 2, 5),
    (10, 16, 4, 2, 4),
    (10, 16, 4, 1, None),
    (50, None, 4, 2, 17),
    (64, 16, 4, 2, 20),
]


@pytest.mark.parametrize("seq,block,q_heads,kv_heads,window", CASES)
def test_banded_matches_reference_values_and_grads(seq, block, q_heads, kv_heads, window):
    q, k, v, ct = _inputs(seq * 7 + (window or 0), 2, seq, q_heads, kv_heads, 8)
    out_b, grads_b = _out_and_grads(q, k, v, ct, window, "banded", block)
    out_r, grads_r = _out_and_grads(q, k, v, ct, window, "reference", None)
    assert out_b.shape == (2, seq, q_heads, 8) and out_b.dtype == jnp.float32
    np.testing.assert_allclose(out_b, out_r, rtol=1e-5, atol=1e-5)
    for name, gb, gr in zip("qkv", grads_b, grads_r):
        assert gb.shape == gr.shape
        np.testing.assert_allclose(gb, gr, rtol=1e-5, atol=1e-5, err_msg=f"grad wrt {name}")


def test_default_implementation_and_window_beyond_seq():
    q, k, v, _ = _inputs(1, 1, 24, 4, 2, 8)
    ref = _ATTN(q, k, v, window=None, implementation="reference")
    np.testing.assert_allclose(sliding_window_attention(q, k, v, None), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sliding_window_attention(q, k, v, 1000), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_ATTN(q, k, v, window=24, implementation="banded", block_size=8),
                               ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["banded", "reference"])
def test_bfloat16_inputs(impl):
    q, k, v, _ = _inputs(3, 2, 40, 4, 2, 16, dtype=jnp.bfloat16)
    out = _ATTN(q, k, v, window=12, implementation=impl, block_size=8 if impl == "banded" else None)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = _ATTN(*f32, window=12, implementation="reference")
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)


_ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not _ON_GPU, reason="cuDNN attention needs an NVIDIA GPU (run on the device machine)")
@pytest.mark.parametrize("seq,q_heads,kv_heads,window", [(50, 4, 2, 1), (50, 4, 2, 17), (129, 4, 1, 128),
                                                         (129, 8, 2, 128), (100, 4, 4, 99), (100, 4, 2, 100),
                                                         (64, 4, 2, None), (300, 4, 2, 1000)])
def test_cudnn_matches_reference_values_and_grads(seq, q_heads, kv_heads, window):
    q, k, v, ct = _inputs(seq + (window or 0), 2, seq, q_heads, kv_heads, 64, dtype=jnp.bfloat16)
    out_c, grads_c = _out_and_grads(q, k, v, ct, window, "cudnn", None)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    out_r, grads_r = _out_and_grads(*f32, window, "reference", None)
    assert out_c.dtype == jnp.bfloat16 and out_c.shape == q.shape
    np.testing.assert_allclose(out_c.astype(jnp.float32), out_r, rtol=2e-2, atol=2e-2)
    for name, gc, gr in zip("qkv", grads_c, grads_r):
        scale = float(jnp.abs(gr).max())
        np.testing.assert_allclose(gc.astype(jnp.float32), gr, rtol=0, atol=3e-2 * scale, err_msg=f"grad {name}")


@pytest.mark.skipif(not _ON_GPU, reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_float32_falls_back_to_banded_and_is_the_gpu_default():
    q, k, v, _ = _inputs(5, 1, 40, 4, 2, 16)
    np.testing.assert_allclose(_ATTN(q, k, v, window=9, implementation="cudnn"),
                               _ATTN(q, k, v, window=9, implementation="reference"), rtol=1e-5, atol=1e-5)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    np.testing.assert_array_equal(_ATTN(qb, kb, vb, window=9, implementation=None),
                                  _ATTN(qb, kb, vb, window=9, implementation="cudnn"))


@pytest.mark.skipif(_ON_GPU, reason="checks the message on machines without a GPU")
def test_cudnn_without_a_gpu_names_the_alternatives():
    q, k, v, _ = _inputs(5, 1, 8, 4, 2, 16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="cudnn.*needs an NVIDIA GPU.*banded"):
        sliding_window_attention(q, k, v, 4, implementation="cudnn")


def _naive_numpy(q, k, v, window):
    """Per-query loop in float64, written independently of the module."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seq, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(q_heads):
            for i in range(seq):
                keys = [j for j in range(seq) if j <= i and i - j < window]
                scores = np.array([q[b, i, h] @ k[b, j, h // group] for j in keys]) / np.sqrt(head_dim)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, i, h] = sum(pj * v[b, j, h // group] for pj, j in zip(p, keys))
    return out


def test_reference_matches_naive_numpy_loop():
    q, k, v, _ = _inputs(5, 2, 13, 4, 2, 8)
    np.testing.assert_allclose(_ATTN(q, k, v, window=5, implementation="reference"),
                               _naive_numpy(q, k, v, 5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_ATTN(q, k, v, window=None, implementation="reference"),
                               _naive_numpy(q, k, v, 13), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "banded"])
def test_window_boundary_exact(impl):
    # Zero keys make attention uniform over the visible keys; v[j] = one-hot(j) reads them off.
    seq, window = 12, 4
    q = jnp.asarray(np.random.default_rng(6).standard_normal((1, seq, 2, seq)), jnp.float32)
    k = jnp.zeros((1, seq, 1, seq), jnp.float32)
    v = jnp.eye(seq, dtype=jnp.float32)[None, :, None, :]
    out = np.asarray(_ATTN(q, k, v, window=window, implementation=impl, block_size=None))[0, :, 0]
    for i in range(seq):
        visible = [j for j in range(seq) if i - window < j <= i]
        expected = np.zeros(seq)
        expected[visible] = 1.0 / len(visible)
        np.testing.assert_allclose(out[i], expected, atol=1e-6, err_msg=f"query {i}")
        if i >= window:
            assert out[i, i - window] == 0.0 and out[i, i - window + 1] > 0.0


@pytest.mark.parametrize("window", [6, None])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_causality_and_window_reach(window, which):
    seq, t = 40, 17
    q, k, v, _ = _inputs(7, 1, seq, 4, 2, 8)
    base = np.asarray(_ATTN(q, k, v, window=window, implementation="banded", block_size=8))
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which].at[:, t].add(3.0)
    out = np.asarray(_ATTN(args["q"], args["k"], args["v"], window=window, implementation="banded", block_size=8))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])  # nothing before t moves
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-3  # ... but t itself does
    if which != "q" and window is not None:
        np.testing.assert_array_equal(out[:, t + window:], base[:, t + window:])  # out of reach
        assert np.abs(out[:, t + window - 1] - base[:, t + window - 1]).max() > 1e-4  # last in reach


def _all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in list(eqn.invars) + list(eqn.outvars):
            shape = getattr(getattr(var, "aval", None), "shape", None)
            if shape is not None:
                yield tuple(shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if hasattr(sub, "eqns"):
                    yield from _all_shapes(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _all_shapes(sub.jaxpr)


def _max_big_axes(fn, *args, big=1024):
    closed = jax.make_jaxpr(fn)(*args)
    return max(sum(d >= big for d in shape) for shape in _all_shapes(closed.jaxpr))


def test_banded_builds_no_seq_by_seq_tensor():
    q, k, v, _ = _inputs(8, 1, 1024, 2, 1, 8)
    def fwd(impl):
        return (lambda q, k, v: sliding_window_attention(q, k, v, 64, implementation=impl, block_size=64))
    def loss(impl):
        return (lambda q, k, v: fwd(impl)(q, k, v).sum())
    def grad(impl):
        return jax.grad(loss(impl), argnums=(0, 1, 2))
    assert _max_big_axes(fwd("banded"), q, k, v) <= 1
    assert _max_big_axes(grad("banded"), q, k, v) <= 1
    # The walker can see a seq x seq tensor when there is one.
    assert _max_big_axes(fwd("reference"), q, k, v) >= 2


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("window,seq", [(6, 20), (None, 9)])
def test_decode_ring_buffer_matches_reference(window, seq, implementation):
    batch, q_heads, kv_heads, head_dim = 2, 4, 2, 8
    q, k, v, _ = _inputs(9, batch, seq, q_heads, kv_heads, head_dim)
    cache_len = window or seq
    k_cache = jnp.zeros((batch, cache_len, kv_heads, head_dim), jnp.float32)
    v_cache = jnp.zeros_like(k_cache)
    positions = jnp.full((batch, cache_len), -1, jnp.int32)
    step = jax.jit(functools.partial(sliding_window_attention_decode, implementation=implementation),
                   static_argnames="window")
    outs = []
    for t in range(seq):
        slot = t % cache_len
        k_cache = k_cache.at[:, slot].set(k[:, t])
        v_cache = v_cache.at[:, slot].set(v[:, t])
        positions = positions.at[:, slot].set(t)
        pos = jnp.full((batch,), t, jnp.int32)
        outs.append(step(q[:, t], k_cache, v_cache, positions, pos, window=window))
    ref = _ATTN(q, k, v, window=window, implementation="reference")
    np.testing.assert_allclose(jnp.stack(outs, axis=1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_len,window,block,splits", [(37, 10, 16, 3), (64, None, 16, 4), (200, 150, 32, None),
                                                        (5, 3, 16, 1)])
def test_pallas_decode_matches_xla_decode(cache_len, window, block, splits):
    # Ring caches with empty (-1), stale, future and in-window slots; cache lengths that are not a
    # multiple of the block or the split, and splits left without slots (37 slots, 3 splits of 16).
    from pallas_kernels.sliding_window_attention.decode import attention_decode

    rng = np.random.default_rng(cache_len)
    batch, q_heads, kv_heads, head_dim = 3, 6, 2, 16
    q = jnp.asarray(rng.standard_normal((batch, q_heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, cache_len, kv_heads, head_dim)), jnp.float32) for _ in "kv")
    positions = jnp.asarray(rng.integers(-1, 2 * cache_len, (batch, cache_len)), jnp.int32)
    position = jnp.asarray([cache_len, 2 * cache_len - 1, 0], jnp.int32)  # row 3 sees at most position 0
    positions = positions.at[2].set(jnp.where(positions[2] > 0, positions[2], -1))  # row 3: nothing visible
    want = sliding_window_attention_decode(q, k, v, positions, position, window, implementation="xla")
    got = attention_decode(q, k, v, positions, position, window=window, block=block, splits=splits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_decode_masks_stale_and_future_slots():
    # Slots holding positions outside (position - window, position] must be ignored.
    q, k, v, _ = _inputs(10, 1, 4, 2, 1, 8)
    k_cache, v_cache = k, v  # 4 slots
    positions = jnp.array([[3, 7, 5, 6]], jnp.int32)  # 3 is stale, 7 is in the future
    out = sliding_window_attention_decode(q[:, 0], k_cache, v_cache, positions, jnp.array([6], jnp.int32), 3)
    keep = jnp.array([2, 3])  # positions 5 and 6
    ref = sliding_window_attention_decode(q[:, 0], k_cache[:, keep], v_cache[:, keep], positions[:, keep],
                                          jnp.array([6], jnp.int32), 3)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def _bad_call(kind):
    q, k, v, _ = _inputs(11, 1, 8, 4, 2, 8)
    i32 = jnp.int32
    calls = {
        "rank": (lambda: sliding_window_attention(q[0], k, v, 4), "q must have rank 4"),
        "kv_shape": (lambda: sliding_window_attention(q, k, v[:, :, :1], 4), "k and v"),
        "seq_mismatch": (lambda: sliding_window_attention(q[:, :4], k, v, 4), "seq"),
        "heads": (lambda: sliding_window_attention(q[:, :, :3], k, v, 4), "kv_heads"),
        "window0": (lambda: sliding_window_attention(q, k, v, 0), "window"),
        "window_neg": (lambda: sliding_window_attention(q, k, v, -3), "window"),
        "block0": (lambda: sliding_window_attention(q, k, v, 4, "banded", 0), "block_size"),
        "impl": (lambda: sliding_window_attention(q, k, v, 4, "flash9"), "implementation.*banded.*reference"),
        "dec_position": (lambda: sliding_window_attention_decode(q[:, 0], k, v, jnp.zeros((1, 8), i32),
                                                                 jnp.zeros((1, 1), i32), 4), "position"),
        "dec_cache_pos": (lambda: sliding_window_attention_decode(q[:, 0], k, v, jnp.zeros((1, 7), i32),
                                                                  jnp.zeros((1,), i32), 4), "cache_positions"),
        "dec_heads": (lambda: sliding_window_attention_decode(q[:, 0, :3], k, v, jnp.zeros((1, 8), i32),
                                                              jnp.zeros((1,), i32), 4), "kv_heads"),
        "dec_window": (lambda: sliding_window_attention_decode(q[:, 0], k, v, jnp.zeros((1, 8), i32),
                                                               jnp.zeros((1,), i32), 0), "window"),
        "dec_impl": (lambda: sliding_window_attention_decode(q[:, 0], k, v, jnp.zeros((1, 8), i32),
                                                             jnp.zeros((1,), i32), 4, implementation="flash"),
                     "implementation"),
    }
    return calls[kind]


@pytest.mark.parametrize("kind", ["rank", "kv_shape", "seq_mismatch", "heads", "window0", "window_neg", "block0",
                                  "impl", "dec_position", "dec_cache_pos", "dec_heads", "dec_window",
                                  "dec_impl"])
def test_bad_inputs_raise_value_error(kind):
    call, match = _bad_call(kind)
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(_ON_GPU, reason="splash is a TPU kernel (interpret mode off GPU)")
@pytest.mark.parametrize("seq,q_heads,kv_heads,window,dtype", [
    (50, 4, 2, 1, jnp.float32), (130, 4, 1, 17, jnp.float32), (200, 4, 4, 128, jnp.float32),
    (129, 8, 2, 129, jnp.float32), (140, 4, 2, 33, jnp.bfloat16)])
def test_splash_matches_reference_values_and_grads(seq, q_heads, kv_heads, window, dtype):
    q, k, v, ct = _inputs(seq + window, 1, seq, q_heads, kv_heads, 64, dtype=dtype)
    out_s, grads_s = _out_and_grads(q, k, v, ct, window, "splash", None)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    out_r, grads_r = _out_and_grads(*f32, window, "reference", None)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    assert out_s.dtype == dtype
    np.testing.assert_allclose(out_s.astype(jnp.float32), out_r, rtol=tol, atol=tol)
    for name, gs, gr in zip("qkv", grads_s, grads_r):
        scale = float(jnp.abs(gr).max())
        np.testing.assert_allclose(gs.astype(jnp.float32), gr, rtol=0, atol=tol * max(scale, 1), err_msg=name)


@pytest.mark.parametrize("seq,block,q_heads,kv_heads,window,dtype", [
    (50, 16, 4, 2, 1, jnp.float32), (50, 16, 4, 2, 17, jnp.float32), (100, 32, 4, 1, 99, jnp.float32),
    (70, 16, 4, 4, 70, jnp.float32), (33, 16, 2, 2, 80, jnp.float32), (64, 16, 8, 2, 20, jnp.float32),
    (200, 16, 4, 2, 64, jnp.float32), (45, 16, 4, 2, 9, jnp.bfloat16)])
def test_pallas_matches_reference_values_and_grads(seq, block, q_heads, kv_heads, window, dtype):
    q, k, v, ct = _inputs(seq + window, 2, seq, q_heads, kv_heads, 16, dtype=dtype)
    out_p, grads_p = _out_and_grads(q, k, v, ct, window, "pallas", block)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    out_r, grads_r = _out_and_grads(*f32, window, "reference", None)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    assert out_p.dtype == dtype and out_p.shape == q.shape
    np.testing.assert_allclose(out_p.astype(jnp.float32), out_r, rtol=tol, atol=tol)
    for name, gp, gr in zip("qkv", grads_p, grads_r):
        scale = float(jnp.abs(gr).max())
        np.testing.assert_allclose(gp.astype(jnp.float32), gr, rtol=0, atol=tol * max(scale, 1), err_msg=name)


def test_pallas_default_tiles_at_a_length_past_one_block_match_reference():
    # seq >= 128 takes the tuned per-kernel tiles (128-row blocks: seq 130 pads to 256).
    from pallas_kernels.sliding_window_attention import sliding_window_attention as pallas_attention

    q, k, v, ct = _inputs(8, 1, 130, 2, 1, 16)
    out_p, vjp = jax.vjp(lambda q, k, v: pallas_attention(q, k, v, 100), q, k, v)
    out_r, grads_r = _out_and_grads(q, k, v, ct, 100, "reference", None)
    np.testing.assert_allclose(out_p, out_r, rtol=1e-5, atol=1e-5)
    for name, gp, gr in zip("qkv", vjp(ct), grads_r):
        np.testing.assert_allclose(gp, gr, rtol=0, atol=1e-5 * max(float(jnp.abs(gr).max()), 1), err_msg=name)


@pytest.mark.parametrize("window", [5, 45, 150])
def test_pallas_with_a_different_tile_per_kernel_matches_reference(window):
    # Unequal blocks per kernel: the band's interior (unmasked) and edge blocks fall differently in
    # each kernel, and the padding (to the largest block) exceeds some kernels' blocks.
    from pallas_kernels.sliding_window_attention import kernels
    from pallas_kernels.sliding_window_attention import sliding_window_attention as pallas_attention

    tiles = kernels.Tiles(kernels.Tile(32, 16, 4, 2), kernels.Tile(16, 64, 4, 1), kernels.Tile(64, 32, 4, 3))
    q, k, v, ct = _inputs(7, 1, 150, 4, 2, 16)
    out_p, vjp = jax.vjp(lambda q, k, v: pallas_attention(q, k, v, window, tiles=tiles), q, k, v)
    out_r, grads_r = _out_and_grads(q, k, v, ct, window, "reference", None)
    np.testing.assert_allclose(out_p, out_r, rtol=1e-5, atol=1e-5)
    for name, gp, gr in zip("qkv", vjp(ct), grads_r):
        np.testing.assert_allclose(gp, gr, rtol=0, atol=1e-5 * max(float(jnp.abs(gr).max()), 1), err_msg=name)


@pytest.mark.parametrize("window", [1, 9, 40])
def test_banded_in_groups_of_query_blocks_matches_reference(monkeypatch, window):
    from samba_jax.ops import attention

    monkeypatch.setattr(attention, "_BAND_LOGITS_BUDGET", 2 * 4 * 8 * 48)  # ~1-2 query blocks per group
    q, k, v, ct = _inputs(window, 2, 61, 4, 2, 8)
    fn = lambda q, k, v: sliding_window_attention(q, k, v, window, implementation="banded", block_size=8)  # noqa: E731
    out, vjp = jax.vjp(fn, q, k, v)
    assert "scan" in str(jax.make_jaxpr(fn)(q, k, v)), "expected the grouped (looped) path"
    out_r, grads_r = _out_and_grads(q, k, v, ct, window, "reference", None)
    np.testing.assert_allclose(out, out_r, rtol=1e-5, atol=1e-5)
    for name, g, gr in zip("qkv", vjp(ct), grads_r):
        np.testing.assert_allclose(g, gr, rtol=1e-5, atol=1e-5, err_msg=name)
