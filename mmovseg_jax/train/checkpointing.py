"""Orbax checkpoints of the training state and the input iterator's position.

Each checkpoint (WORKDIR/checkpoints/<step>/) holds two items: `state` (parameters,
optimiser state, step; saved asynchronously) and `data` (the input position: global
batches consumed, as JSON). Orbax writes a step under a temporary name and renames it
when complete, so an interrupted save never shadows the last complete checkpoint.
`restore` places the arrays on the shardings of the state it is given, so a checkpoint
saved on one mesh (say 2 processes x 4 devices) restores on another (1 x 8, or 4).
A save that fails (a full disk, a file-size limit) raises CheckpointError naming the step,
the folder and the last complete checkpoint, which it leaves intact; leftovers of an
interrupted save are removed when the next run opens the folder.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint could not be written."""


# The OS failures a save meets in practice, recognised by their text where no code is given.
_OS_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def failure_reason(error: BaseException) -> str:
    """What made a save fail, in a few words: "File too large, errno 27" when an OS error is
    behind it (an OSError anywhere in the exception chain; TensorStore's "os_error_code"
    wherever it stands in its message, quoted or not; "[Errno N]"; or the OS's own text for
    a full disk, a file-size limit, a quota, a read-only or unreadable folder), else the
    exception's type with the start and end of its message."""
    chain, seen = [], error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno:
            return f"{os.strerror(e.errno)}, errno {e.errno}"
    text = " ".join(" ".join(str(e).split()) for e in chain)
    code = re.search(r"os_error_code\W{0,3}(\d+)", text) or re.search(r"\[Errno (\d+)\]", text)
    if code:
        return f"{os.strerror(int(code.group(1)))}, errno {code.group(1)}"
    for number in _OS_ERRNOS:
        if os.strerror(number) in text:
            return f"{os.strerror(number)}, errno {number}"
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message if len(message) <= 300 else message[:150] + ' ... ' + message[-150:]}"


class Checkpointer:
    def __init__(self, workdir: str | Path, keep: int = 2, save_every: int = 0):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                 save_interval_steps=max(save_every, 1),
                                                 cleanup_tmp_directories=True))
        self._saving: int | None = None  # the step of the save in flight

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _failed(self, step: int | None, error: Exception) -> CheckpointError:
        complete = [s for s in self.manager.all_steps() if s != step]
        last = f"step {max(complete)} ({self.directory / str(max(complete))}) is intact" if complete else \
            "there is no earlier checkpoint"
        return CheckpointError(f"saving checkpoint step {step} in {self.directory} failed ({failure_reason(error)}); "
                               f"{last}")

    def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
        """Starts an asynchronous save (if `step` is due, or `force`); returns whether it saved.
        A failure of this save or of the previous one raises CheckpointError."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore surface OS errors as various types
            raise self._failed(self._saving if self._saving is not None else step, e) from e
        if saved:
            self._saving = step
        return saved

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

    def close(self, quiet: bool = False) -> None:
        """Waits for the save in flight; CheckpointError if it failed (unless `quiet`: while
        another error is on its way up)."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            if not quiet:
                raise self._failed(self._saving, e) from e
        finally:
            self.manager.close()
