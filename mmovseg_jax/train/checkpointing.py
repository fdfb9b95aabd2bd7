"""Orbax checkpoints of the training state and the input iterator's position.

Each checkpoint (WORKDIR/checkpoints/<step>/) holds two items: `state` (parameters,
optimiser state, step; saved asynchronously) and `data` (the input position: global
batches consumed, as JSON). Orbax writes a step under a temporary name and renames it
when complete, so an interrupted save never shadows the last complete checkpoint.
`restore` places the arrays on the shardings of the state it is given, so a checkpoint
saved on one mesh (say 2 processes x 4 devices) restores on another (1 x 8, or 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str | Path, keep: int = 2, save_every: int = 0):
        self.manager = ocp.CheckpointManager(
            Path(workdir).absolute() / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                 save_interval_steps=max(save_every, 1)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
        """Starts an asynchronous save (if `step` is due, or `force`); returns whether it saved."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, like: Any) -> tuple[Any, dict | None]:
        """Restores `step` into the structure, shapes and shardings of `like`."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        args = {"state": ocp.args.StandardRestore(abstract)}
        has_data = (Path(self.manager.directory) / str(step) / "data").is_dir()
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored.state, (restored.data if has_data else None)

    def resume(self, state: Any) -> tuple[Any, int, int]:
        """(state, start step, start global batch) of the latest checkpoint, restored onto the
        shardings of `state` whatever mesh saved it; (state, 0, 0) when there is none."""
        from mmovseg_jax.data import sources

        start = self.latest_step() or 0
        if not start:
            return state, 0, 0
        state, data_state = self.restore(start, state)
        print(f"resumed from {Path(self.manager.directory) / str(start)}", flush=True)
        return state, start, sources.start_batch(data_state, start)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
