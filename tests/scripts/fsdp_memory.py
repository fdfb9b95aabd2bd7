"""Compiled per-device memory of the CMU train step's state, replicated vs FSDP.

Run with 8 (fake) devices: prints one JSON line {fsdp: state bytes per device, ...},
where the state (trainable parameters + AdamW moments + step) is read from the
compiled step's memory analysis: argument bytes minus the batch and teacher bytes.
"""

import dataclasses
import json

import jax
import numpy as np
from flax import nnx

from configs import cmu as cmu_config
from mmovseg_jax.models import dino
from mmovseg_jax.train import cmu, loop, optim, sharding


def state_bytes_per_device(fsdp: int) -> tuple[int, int]:
    config = cmu_config.get_config()
    config.global_batch_size = 8
    mesh = sharding.make_mesh(-1, fsdp)
    teacher = dino.Model(dataclasses.replace(dino.VARIANTS["S/16"], image_size=32, depth=2), rngs=nnx.Rngs(0))
    aligner = cmu.Aligner(teacher.config, len(config.blocks), rngs=nnx.Rngs(1))
    aligner_def, params = nnx.split(aligner)
    teacher_def, teacher_params = nnx.split(teacher)
    tx, lr = optim.make(config.optimizer, 10)
    state = loop.initial_state(params, tx.init(params))
    shardings = sharding.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    teacher_params = jax.device_put(teacher_params, sharding.replicated(mesh))
    batch = sharding.to_global({"rgb": np.zeros((8, 32, 32, 3), np.uint8), "sar": np.zeros((8, 32, 32), np.uint8)},
                               mesh)
    config.blocks = (0, 1)
    step = cmu.make_train_step(aligner_def, teacher_def, tx, lr, config, mesh, shardings)
    analysis = step.lower(state, teacher_params, batch).compile().memory_analysis()
    other = sum(x.nbytes for x in jax.tree.leaves(teacher_params)) + sum(
        x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(batch))
    full = sum(x.nbytes for x in jax.tree.leaves(state))
    return int(analysis.argument_size_in_bytes - other), int(full)


if __name__ == "__main__":
    results = {}
    for fsdp in (1, 8):
        per_device, full = state_bytes_per_device(fsdp)
        results[fsdp] = per_device
        results["full"] = full
    print(json.dumps(results))
