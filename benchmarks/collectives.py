"""Bandwidth of the collectives the sharded train step uses, over all local devices; one table.

python benchmarks/collectives.py --sizes_mib=64,512,2048

all-reduce (data-parallel gradients), all-gather (FSDP parameters), reduce-scatter (FSDP
gradients) and a neighbour ppermute (context-parallel halo / ring), each on a float32 array of the
given size per device, under jax.jit + shard_map. Bus bandwidth follows nccl-tests: all-reduce
moves 2(n-1)/n of the buffer per device, reduce-scatter (n-1)/n, all-gather (n-1)/n of its n-times
larger output, a ppermute the whole buffer.
Baseline: the interconnect's nominal per-direction bandwidth, if given with --nominal_gbps.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_mib", default="64,512,2048", help="per-device buffer sizes, MiB")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--nominal_gbps", type=float, default=0.0, help="e.g. 450 for H200 NVLink, per direction")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from benchmarks.timing import median_ms

    n = jax.device_count()
    if n < 2:
        raise SystemExit(f"collectives need at least 2 devices, found {n}")
    mesh = jax.make_mesh((n,), ("x",))
    perm = [(i, (i + 1) % n) for i in range(n)]
    ops = {
        "all-reduce": (lambda x: jax.lax.psum(x, "x"), P("x"), 2 * (n - 1) / n),
        "all-gather": (lambda x: jax.lax.all_gather(x, "x", tiled=True), P(), n - 1),
        "reduce-scatter": (lambda x: jax.lax.psum_scatter(x, "x", tiled=True), P("x"), (n - 1) / n),
        "ppermute (ring)": (lambda x: jax.lax.ppermute(x, "x", perm), P("x"), 1.0),
    }
    print("| collective | MiB per device | ms | bus GB/s | vs nominal |\n|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes_mib.split(",")):
        rows = size * 2**20 // 4 // 1024
        x = jax.device_put(jnp.ones((n * rows, 1024), jnp.float32), NamedSharding(mesh, P("x")))
        for name, (fn, out_spec, factor) in ops.items():
            f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=out_spec, check_vma=False))
            seconds = median_ms(f, x, iters=args.iters) / 1e3
            bus = factor * size * 2**20 / seconds / 1e9
            nominal = f"{bus / args.nominal_gbps:.2f}x" if args.nominal_gbps else "-"
            print(f"| {name} | {size} | {seconds * 1e3:.2f} | {bus:.1f} | {nominal} |", flush=True)
    print(f"\n{n} x {jax.devices()[0].device_kind}, jax {jax.__version__}; float32 buffers.")


if __name__ == "__main__":
    main()
