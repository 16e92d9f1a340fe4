"""The backward's reverse recurrence over a (4, 32) tile on one warp, by inline-PTX warp shuffles.

The channel-major backward runs, per state, the adjoint h_t = a_t h_{t+1} + b_t backwards over each
tile's 32 steps. Triton's `tt.scan` with reverse=True lowers it with flips of the operands and the
result across lanes: compiled for sm_90 (upstream Triton 3.5.1, ptxas 12.8), one (4, 32) reverse
scan on one warp takes 66 shuffles against 6 for the same scan forwards, and the backward kernel
spends about 1000 of its ~4500 instructions per tile on them.

In the tile's layout (4 channels x 32 steps on one warp: sizePerThread [1, 4], threadsPerWarp
[4, 8], lane = 8 c + t // 4) each lane holds 4 consecutive steps of one channel and the 8 lanes of
a channel are one aligned segment. `reverse_recurrence` runs as one inline-PTX block per thread on
its 4 steps (pack=4):
  1. its own 4 steps backwards: the affine map h_first = P h_next + H of its segment of steps;
  2. a suffix scan of those maps over the 8 lanes (shfl.down by 1, 2, 4 within the segment,
     Hillis-Steele: (P, H) <- (P P', P H' + H) with the later lane's (P', H'));
  3. h entering from the next lane (one more shfl.down; 0 at the tile's last lane), then its 4 steps
     again: h_t = a_t h_{t+1} + b_t.
6 shuffles in all, no flips. The PTX block assumes that layout: `applies` names where it is known to
hold, the GPU tests check the kernel's gradients there, and elsewhere (and in interpret mode) the
callers use `linear_recurrence(reverse=True)`.
Fewer instructions did not make it faster: in its one timed run (H200, BENCHMARKS.md, 2026-12-06,
fourth session) forward+backward was 13-16% slower with it, so callers leave it off by default.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.selective_scan.linear_recurrence import linear_recurrence

# Operands: $0-$3 h at the thread's 4 steps (out), $4-$7 a, $8-$11 b (pack=4: one operand per element,
# element-major within each tensor). shfl c = 0x181f: segments of 8 lanes (mask 0b11000 << 8), clamp 31.
_REVERSE = """{
.reg .pred valid;
.reg .f32 p, h, p_next, h_next, h3, h2, h1, h0;
mul.f32 p, $6, $7;
fma.rn.f32 h, $6, $11, $10;
fma.rn.f32 h, $5, h, $9;
mul.f32 p, $5, p;
fma.rn.f32 h, $4, h, $8;
mul.f32 p, $4, p;
shfl.sync.down.b32 h_next|valid, h, 1, 0x181f, 0xffffffff;
shfl.sync.down.b32 p_next, p, 1, 0x181f, 0xffffffff;
@valid fma.rn.f32 h, p, h_next, h;
@valid mul.f32 p, p, p_next;
shfl.sync.down.b32 h_next|valid, h, 2, 0x181f, 0xffffffff;
shfl.sync.down.b32 p_next, p, 2, 0x181f, 0xffffffff;
@valid fma.rn.f32 h, p, h_next, h;
@valid mul.f32 p, p, p_next;
shfl.sync.down.b32 h_next|valid, h, 4, 0x181f, 0xffffffff;
@valid fma.rn.f32 h, p, h_next, h;
shfl.sync.down.b32 h_next|valid, h, 1, 0x181f, 0xffffffff;
@!valid mov.f32 h_next, 0f00000000;
fma.rn.f32 h3, $7, h_next, $11;
fma.rn.f32 h2, $6, h3, $10;
fma.rn.f32 h1, $5, h2, $9;
fma.rn.f32 h0, $4, h1, $8;
mov.f32 $0, h0;
mov.f32 $1, h1;
mov.f32 $2, h2;
mov.f32 $3, h3;
}"""


def applies(block_d: int, chunk: int, num_warps: int) -> bool:
    """Whether Triton lays the tile out as the PTX block assumes: 4 channels x 32 steps on one warp
    (the layout `channel_sums` assumes too)."""
    return block_d == 4 and chunk == 32 and num_warps == 1


def reverse_recurrence(a, b, *, interpret: bool):
    """(4, 32) float32 tiles, steps along axis 1 -> h with h_t = a_t h_{t+1} + b_t, zero after the
    last step: `linear_recurrence(a, b, axis=1, reverse=True)` in 6 warp shuffles."""
    if interpret:
        return linear_recurrence(a, b, axis=1, reverse=True)
    [h] = pltriton.elementwise_inline_asm(
        _REVERSE, args=[a, b], constraints=",".join(["=f"] * 4 + ["f"] * 8), pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(b.shape, b.dtype)])
    return h
