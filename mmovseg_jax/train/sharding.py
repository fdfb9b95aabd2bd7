"""Device mesh from a config, parameter sharding rules, and host batches as global arrays.

The mesh has two axes, ("data", "fsdp"). The batch is split over both; parameters and
optimiser state are replicated over "data" and, when fsdp > 1, each array is split
over "fsdp" along its largest dimension that divides evenly (FSDP / ZeRO-3 style: XLA
gathers a layer's weights where it needs them). With fsdp = 1 this is plain data
parallelism. `config.mesh.rules` overrides that choice by name: (regex, spec) pairs
matched (re.search, first match wins) against each array's dotted path in the state,
e.g. ("pos_embed", "replicated") or ("mlp.fc1.kernel", "None,fsdp"); a spec names one
mesh axis or None per dimension.
"""

from __future__ import annotations

from typing import Any, Mapping

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over every device of every process; data = -1 takes the rest."""
    devices = jax.device_count()
    fsdp = int(fsdp or 1)
    if fsdp < 1 or devices % fsdp:
        raise ValueError(f"config.mesh.fsdp = {fsdp} does not divide the {devices} devices")
    data = devices // fsdp if data in (-1, 0, None) else int(data)
    if data * fsdp != devices:
        raise ValueError(f"config.mesh.data x config.mesh.fsdp = {data} x {fsdp} is not the {devices} devices")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_devices(mesh: Mesh) -> int:
    return mesh.shape[DATA] * mesh.shape[FSDP]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int = 2 ** 14) -> NamedSharding:
    """Sharding of one parameter-like array: its largest dimension divisible by the fsdp
    size is split over "fsdp"; small arrays (< min_size elements) stay replicated."""
    n = mesh.shape[FSDP]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated(mesh)


def parse_spec(spec: str, ndim: int, mesh: Mesh, where: str) -> NamedSharding:
    """"replicated" or one comma-separated entry per dimension (a mesh axis or None)."""
    if spec.strip() == "replicated":
        return replicated(mesh)
    axes = [a.strip() for a in spec.split(",")]
    axes = [None if a in ("None", "") else a for a in axes]
    unknown = [a for a in axes if a is not None and a not in mesh.axis_names]
    if len(axes) != ndim or unknown:
        raise ValueError(f"config.mesh.rules: spec {spec!r} for {where} needs {ndim} entries from "
                         f"{mesh.axis_names} or None")
    return NamedSharding(mesh, PartitionSpec(*axes))


def state_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = ()) -> Any:
    """The sharding of every array of a pytree (parameters, optimiser state, ...): the first
    rule whose regex matches its dotted path, else `fsdp_sharding`."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def choose(path, x):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return parse_spec(spec, np.ndim(x), mesh, name)
        return fsdp_sharding(tuple(np.shape(x)), mesh)

    return jax.tree_util.tree_map_with_path(choose, tree)


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "config.global_batch_size") -> None:
    devices = batch_devices(mesh)
    if global_batch_size % devices:
        raise ValueError(f"{field} = {global_batch_size} is not divisible by the {devices} devices of the mesh")


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of a batch -> global arrays sharded over every device."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
