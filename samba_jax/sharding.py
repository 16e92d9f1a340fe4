"""Device meshes and the logical-axis rules that map parameters and activations onto them.

MaxText's scheme: every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`,
`ssm_inner`, ...; see model/), activations at block boundaries carry `act_batch`, `act_length`,
`act_embed`, and one rules table maps each logical name to mesh axes. The mesh has four axes:
  data     pure data parallelism (parameters replicated);
  fsdp     data parallelism with parameters and optimizer state sharded (ZeRO-3 style);
  tensor   Megatron-style: heads, MLP hidden, d_inner and vocab split across devices;
  context  the sequence split across devices (context parallelism; see ops/context_parallel.py).
`config.mesh` gives the degree of each (-1: all remaining devices) and, for multi-slice TPU jobs,
the across-slice (DCN) degrees `dcn_*`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samba_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Logical name -> mesh axes. A mesh axis is used at most once per array: flax skips a rule whose
# axes are already taken by an earlier dimension.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("ssm_inner", "tensor"),
    ("ssm_state", None),
    ("ssm_proj", None),
    ("ssm_rank", None),
    ("conv_width", None),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Resolves config.mesh's degrees (one may be -1) to sizes whose product is num_devices."""
    sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
    dcn = {axis: int(mesh_cfg.get(f"dcn_{axis}", 1)) for axis in MESH_AXES}
    per_slice = num_devices // math.prod(dcn.values()) if num_devices % math.prod(dcn.values()) == 0 else None
    if per_slice is None:
        raise ConfigError(f"config.mesh: the across-slice degrees {dcn} do not divide the {num_devices} devices. "
                          "Fix: make the product of mesh.dcn_* the number of slices.")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ConfigError(f"config.mesh.{bad[0]}={sizes[bad[0]]} is not a degree. Fix: use a positive size or -1.")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"config.mesh: only one axis may be -1, got {fill}. Fix: give all but one a size.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if per_slice % known:
            raise ConfigError(f"config.mesh: the fixed degrees multiply to {known}, which does not divide the "
                              f"{per_slice} devices per slice. Fix: choose degrees dividing {per_slice}.")
        sizes[fill[0]] = per_slice // known
    if math.prod(sizes.values()) != per_slice:
        raise ConfigError(f"config.mesh {sizes} has {math.prod(sizes.values())} devices but {per_slice} are "
                          f"available per slice ({num_devices} in all). Fix: make the degrees multiply to "
                          f"{per_slice}, or set one of them to -1.")
    return {axis: sizes[axis] * dcn[axis] for axis in MESH_AXES} | {f"dcn_{a}": dcn[a] for a in MESH_AXES}


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES (Auto axis types: the XLA SPMD partitioner propagates shardings)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    ici = [shape[a] // shape[f"dcn_{a}"] for a in MESH_AXES]
    dcn = [shape[f"dcn_{a}"] for a in MESH_AXES]
    if math.prod(dcn) > 1:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(ici, devices)
        except (AssertionError, NotImplementedError, ValueError):  # CPU / unknown topology: row-major
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules(config: Any) -> tuple[tuple[str, Any], ...]:
    """config.sharding_rules (a sequence of (logical, mesh axes) pairs) if set, else DEFAULT_RULES."""
    custom = config.get("sharding_rules") if hasattr(config, "get") else None
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in custom) if custom \
        else DEFAULT_RULES


def logical_spec(names: Sequence[str | None], rule_table=None) -> P:
    """PartitionSpec of an array whose dimensions have these logical names (under the active rules)."""
    return nn.logical_to_mesh_axes(tuple(names), rule_table)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op when no mesh is active (one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names))


def active_axis_size(axis: str) -> int:
    """Size of a mesh axis of the active mesh (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(axis, 1)


def state_shardings(boxed_abstract_state: Any, mesh: Mesh, rule_table) -> Any:
    """NamedShardings for a state whose parameter leaves are flax `Partitioned` boxes (abstract)."""
    specs = nn.get_partition_spec(boxed_abstract_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rule_table)


def batch_sharding(mesh: Mesh, rule_table) -> NamedSharding:
    """Tokens (accum_steps, micro_batch, seq + 1): micro-batch over the batch axes; length whole
    (the shifted targets make it seq + 1; activations are split over `context` inside the model)."""
    with nn.logical_axis_rules(rule_table):
        spec = logical_spec((None, "act_batch", None))
    return NamedSharding(mesh, spec)


def check_model_fits_mesh(model_cfg: Any, mesh_sizes: dict[str, int], seq_len: int, micro_batch: int) -> None:
    """Named errors, before compiling, for shapes the mesh cannot split evenly."""
    tensor, context = mesh_sizes["tensor"], mesh_sizes["context"]
    batch_ways = mesh_sizes["data"] * mesh_sizes["fsdp"]
    checks = [
        ("micro_batch_size", micro_batch, batch_ways, "mesh.data * mesh.fsdp"),
        ("model.num_heads", model_cfg.num_heads, tensor, "mesh.tensor"),
        ("model.num_kv_heads", model_cfg.num_kv_heads, tensor, "mesh.tensor"),
        ("model.mlp_hidden", model_cfg.mlp_hidden, tensor, "mesh.tensor"),
        ("model.d_inner", model_cfg.d_inner, tensor, "mesh.tensor"),
        ("data.seq_len", seq_len, context, "mesh.context"),
    ]
    for field, value, ways, axis in checks:
        if value % ways:
            raise ConfigError(f"config.{field}={value} is not divisible by {axis}={ways}, so the mesh cannot split "
                              f"it. Fix: change {field} or {axis} so that {ways} divides it.")
