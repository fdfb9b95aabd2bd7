"""Compiled memory of InfoNCE value-and-grad: dense vs chunked, on a data-parallel mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/infonce_memory.py
    python benchmarks/infonce_memory.py --batches 16384 --dim 768 --chunk 1024 --record

The mesh is one "data" axis over every local device (on CPU, XLA_FLAGS above gives 8
fake devices; it must be set before JAX starts). For each global batch B the script
compiles (never runs) `jax.value_and_grad` w.r.t. query, key and temperature of:

- `info_nce` dense / chunked, under `jax.jit` on inputs sharded over "data" (XLA's
  partitioner decides the layout), and
- `sharded_info_nce` dense / chunked (explicit `shard_map`),

from `jax.ShapeDtypeStruct` inputs (float32 (B, D), batch-sharded), and prints the
per-device sizes from `compiled.memory_analysis()`: temporaries, arguments, outputs,
next to the size of the dense B x B float32 logits and the ratio temp / logits.
`--record` appends the table to benchmarks/RESULTS.md (or `--results PATH`).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from mmovseg_jax import losses  # noqa: E402

MIB = 2.0 ** 20
VARIANTS = ("info_nce dense", "info_nce chunked", "sharded dense", "sharded chunked")


def compiled_memory(variant: str, batch: int, dim: int, chunk: int, symmetric: bool, mesh) -> dict:
    """Per-device memory of the compiled value-and-grad of one loss variant, in bytes."""
    chunk_size = chunk if variant.endswith("chunked") else None
    if variant.startswith("sharded"):
        def loss(q, k, t):
            return losses.sharded_info_nce(q, k, t, mesh=mesh, symmetric=symmetric, chunk_size=chunk_size)
    else:
        def loss(q, k, t):
            return losses.info_nce(q, k, t, symmetric=symmetric, chunk_size=chunk_size)

    batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
    x = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=batch_sharded)
    t = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    mem = step.lower(x, x, t).compile().memory_analysis()
    return dict(temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes, out=mem.output_size_in_bytes)


def run(batches, dim: int, chunk: int, symmetric: bool = True, variants=VARIANTS) -> list[dict]:
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = []
    for batch in batches:
        logits = 4 * batch * batch
        for variant in variants:
            m = compiled_memory(variant, batch, dim, chunk, symmetric, mesh)
            rows.append(dict(batch=batch, dim=dim, chunk=chunk if variant.endswith("chunked") else None,
                             variant=variant, logits=logits, ratio=m["temp"] / logits, **m))
    return rows


def _mib(size: int) -> str:
    return f"{size / MIB:.2f}" if size >= MIB else f"{size / MIB:.4g}"


def table(rows: list[dict]) -> str:
    head = ("| B | D | chunk | variant | temp MiB | args MiB | out MiB | B x B fp32 logits MiB | temp / logits |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['batch']} | {r['dim']} | {r['chunk'] or '-'} | {r['variant']} | {_mib(r['temp'])} | "
             f"{_mib(r['args'])} | {_mib(r['out'])} | {_mib(r['logits'])} | {100 * r['ratio']:.2f}% |"
             for r in rows]
    return "\n".join([head, *lines])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1024,4096,16384,65536", help="comma list of global batch sizes")
    p.add_argument("--dim", type=int, default=768, help="embedding width D")
    p.add_argument("--chunk", type=int, default=1024, help="keys per step of the chunked variants")
    p.add_argument("--one-way", action="store_true", help="query->key direction only (default: symmetric)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    p.add_argument("--record", action="store_true", help="append the table to --results")
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md",
                   help="file --record appends to (default benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    batches = [int(b) for b in args.batches.split(",")]
    rows = run(batches, args.dim, args.chunk, not args.one_way, variants)
    devices = jax.devices()
    device = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
    text = table(rows)
    print(f"device: {device}; jax {jax.__version__}; per-device sizes; "
          f"{'one-way' if args.one_way else 'symmetric'} loss, value and grad w.r.t. query, key, temperature")
    print(text)
    if args.record:
        with args.results.open("a") as f:
            f.write(f"\n## infonce_memory, {datetime.date.today()}, {device} ({platform.node()})\n\n"
                    f"jax {jax.__version__}; per-device compiled sizes (`memory_analysis()`), "
                    f"{'one-way' if args.one_way else 'symmetric'}, value and grad; command: "
                    f"`{' '.join(sys.argv)}`\n\n{text}\n")
    return rows


if __name__ == "__main__":
    main()
