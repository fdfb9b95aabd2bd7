"""Device mesh from a config, and host batches as global arrays sharded over it."""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def make_mesh(data: int = -1) -> Mesh:
    """A 1-D mesh whose "data" axis spans `data` devices (-1: every device of every process)."""
    count = jax.device_count() if data in (-1, 0, None) else int(data)
    if count > jax.device_count() or jax.device_count() % count:
        raise ValueError(f"config.mesh.data = {data} does not divide the {jax.device_count()} devices")
    return jax.make_mesh((count,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "config.global_batch_size") -> None:
    devices = mesh.shape[DATA]
    if global_batch_size % devices:
        raise ValueError(f"{field} = {global_batch_size} is not divisible by the {devices} devices of the "
                         f"data axis")


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of a batch -> global arrays sharded over the data axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
