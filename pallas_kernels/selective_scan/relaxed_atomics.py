"""`add_relaxed(ref, idx, values)`: float atomic adds with relaxed memory order in a Pallas Triton kernel.

Pallas' `atomic_add` lowers to Triton's atomic_rmw with acquire-release order at GPU scope. Compiled
for sm_90 (upstream Triton 3.5.1, ptxas 12.8) every such add becomes ATOMG followed by
MEMBAR.ALL.GPU, a fence that waits for all of the thread's outstanding memory operations. Sums that
only accumulate, and are read after the kernel has ended, need no ordering: with relaxed order the
same adds become fire-and-forget REDG reductions (vectorised, F32x4), no fence, as CUDA's atomicAdd
(what mamba_ssm's backward accumulates dB and dC with).

This is `atomic_rmw` with one difference, its memory order: a primitive of its own whose Triton
lowering runs Pallas' rule for `atomic_rmw` with relaxed order, and whose abstract evaluation and
interpret-mode (state discharge) rule are Pallas' own. It uses jax's private Pallas-Triton API,
pinned by the exact jax version in setup.py (as `linear_recurrence` does); tests/pallas_kernels run
it in interpret mode on CPU and on the GPU.
"""

from __future__ import annotations

import functools
from unittest import mock

from jax import tree_util
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering as triton_lowering
from jax._src.pallas.triton import primitives as triton_primitives
from jax._src.state import discharge as state_discharge
from jax._src.state import primitives as state_primitives
from jax.extend import core as jex_core

_ADD = triton_primitives.AtomicOpType.ADD

relaxed_atomic_rmw_p = jex_core.Primitive("relaxed_atomic_rmw")
relaxed_atomic_rmw_p.def_effectful_abstract_eval(triton_primitives._atomic_abstract_eval)
state_discharge.register_discharge_rule(relaxed_atomic_rmw_p)(triton_primitives._atomic_rmw_discharge_rule)


def _relaxed_lowering_rule(ctx, *args_flat, args_tree, atomic_type):
    relaxed = functools.partial(triton_lowering._atomic_rmw, semantic=tt_dialect.MemSemantic.RELAXED)
    with mock.patch.object(triton_lowering, "_atomic_rmw", relaxed):  # only while this op lowers
        return triton_primitives._atomic_lowering_rule(ctx, *args_flat, args_tree=args_tree, atomic_type=atomic_type)


triton_lowering.triton_lowering_rules[relaxed_atomic_rmw_p] = _relaxed_lowering_rule


def add_relaxed(ref, idx, values):
    """ref[idx] += values, atomically, in relaxed memory order (no mask: callers pad their accumulators)."""
    ref, transforms = state_primitives.get_ref_and_transforms(ref, idx, "atomic_rmw")
    args_flat, args_tree = tree_util.tree_flatten((ref, transforms, values, None))
    return relaxed_atomic_rmw_p.bind(*args_flat, args_tree=args_tree, atomic_type=_ADD)
