"""Sums over a tile's 4 channels for 4 rows at once, by warp shuffles (the backward's dB, dC).

The channel-major backward's default tile, 4 channels x 32 steps on one warp, lies in Triton's
default layout as 4 groups of 8 lanes, one channel each, every thread holding 4 consecutive steps
(sizePerThread [1, 4], threadsPerWarp [4, 8]: lane = 8 c + t // 4). `jnp.sum` over the channels is
then a butterfly that leaves every lane group the whole sum: 2 rounds x 4 values = 8 shuffles and
8 adds per thread, for each state's dB and dC, and a (1, chunk) row to store.

Four states' sums fit the tile's own shape instead: row c of the result is state c's sum, so each
lane group ends with a different state and the (4, chunk) block is stored as it lies. Two halving
rounds get there (a reduce-scatter over the rows):
  `pair_sums(x0, x1)`: lanes of channels c and c ^ 1 (lane ^ 8) trade one row each:
      out[c] = x_{c & 1}[c] + x_{c & 1}[c ^ 1]   (row c & 1, summed over the pair {c, c ^ 1});
  `quad_sums(p0, p1)`: lanes of c and c ^ 2 (lane ^ 16) trade again:
      out[c] = p_{c >> 1}[c] + p_{c >> 1}[c ^ 2].
  quad_sums(pair_sums(x0, x1), pair_sums(x2, x3))[c] = sum over the 4 channels of x_c.
That is 12 shuffles and 12 adds per thread for 4 rows instead of 32 and 32, plus the tests and
selects that pick which row a lane sends, and one store instead of four. On an H100 the backward
then issues about 4% fewer instructions (ncu: issue rate x duration) and
stalls less between them (4.7 against 5.9 cycles per instruction), but ptxas gives it 255 registers
instead of 168, so 8 one-warp programs fit per SM instead of 12: it pays only on grids that do not
fill the GPU many times over (`selective_scan.default_four_row_sums`; benchmarks/HISTORY.md, 2026-12-06).

The shuffles assume that layout: `applies` names the tiles it is known for, and the GPU tests check
the kernel's dB and dC there. Elsewhere, and in interpret mode (CPU), the same contracts run as
row permutations in plain jnp, so CI checks the bookkeeping exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

CHANNELS = 4  # channels of the tile, one lane group of 8 lanes each

# One element: $0 out, $1 x_even, $2 x_odd, $3 the element's channel. The lane whose channel has
# bit `mask` set keeps the odd row and sends the even one, its partner (lane ^ 8 * mask) the reverse.
_TRADE = """{{
.reg .pred set;
.reg .b32 bit, send, keep, got;
and.b32 bit, $3, {bit};
setp.ne.b32 set, bit, 0;
selp.b32 send, $1, $2, set;
selp.b32 keep, $2, $1, set;
shfl.sync.bfly.b32 got, send, {lanes}, 31, 0xffffffff;
add.f32 $0, keep, got;
}}"""


def applies(block_d: int, chunk: int, num_warps: int, d_state: int) -> bool:
    """Whether Triton lays the tile out as the shuffles assume (4 channels x 32 steps on one warp)
    and the states come in fours (the backward sums dB, and dC, of 4 states at a time)."""
    return block_d == CHANNELS and chunk == 32 and num_warps == 1 and d_state % CHANNELS == 0


def channel_index(chunk: int):
    """(4, chunk) int32: each element's channel."""
    return lax.broadcasted_iota(jnp.int32, (CHANNELS, chunk), 0)


def _trade(x_even, x_odd, channel, bit, interpret):
    """out[c] = x_s[c] + x_s[c ^ bit] with s = (c & bit) != 0: rows of (4, chunk) float32 tiles."""
    if interpret:
        selected = channel & bit
        keep = jnp.where(selected != 0, x_odd, x_even)
        send = jnp.where(selected != 0, x_even, x_odd)
        partner = jnp.stack([send[c ^ bit] for c in range(CHANNELS)])  # the lane of channel c ^ bit
        return keep + partner
    [out] = pltriton.elementwise_inline_asm(
        _TRADE.format(bit=bit, lanes=8 * bit), args=[x_even, x_odd, channel], constraints="=f,f,f,r",
        pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(x_even.shape, x_even.dtype)])
    return out


def pair_sums(x0, x1, channel, *, interpret: bool):
    """(4, chunk) x 2 -> (4, chunk): out[c] = x_{c & 1}[c] + x_{c & 1}[c ^ 1]."""
    return _trade(x0, x1, channel, 1, interpret)


def quad_sums(p0, p1, channel, *, interpret: bool):
    """(4, chunk) x 2 -> (4, chunk): out[c] = p_{c >> 1}[c] + p_{c >> 1}[c ^ 2]; of two `pair_sums`,
    row c is the sum over the 4 channels of the c-th row that went in."""
    return _trade(p0, p1, channel, 2, interpret)
