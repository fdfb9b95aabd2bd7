"""The training loop both stages share, and what keeps a run safe.

    state, stopped = loop.run_steps(train_step, state, batches, start, config, checkpointer, reporter, ...)

- **Signals**: SIGTERM or SIGINT (Ctrl-C) asks the loop to stop after the current step;
  it saves a checkpoint at that step, waits for the write to finish and returns. A
  second Ctrl-C aborts at once. In a multi-process run the processes agree at each
  log step (one tiny collective), so they all stop at the same step.
- **Non-finite loss**: the jitted step calls `guard` on its result. It never applies an
  update whose loss or gradient norm is NaN/inf. Under `config.faults.on_nonfinite =
  "stop"` (default) the state is frozen from the first such step on, and the loop stops
  with that step at the next log step or checkpoint, without saving it: the last
  checkpoint on disk is the last good state. Under `"skip"` the bad update is dropped,
  counted (`skipped` in the logs) and training goes on.
- **Checkpoints** are saved at `config.checkpoint_every` and at the end; failures (a
  full disk) raise `checkpointing.CheckpointError`, the previous checkpoint intact.

The state is a dict {"params", "opt_state", "step", "nonfinite_step", "skipped"}; build
it with `initial_state`.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmovseg_jax.models import layers

NONFINITE_POLICIES = ("stop", "skip")


class TrainingStopped(RuntimeError):
    """Training cannot go on (a non-finite loss under the "stop" policy)."""


def initial_state(params: Any, opt_state: Any) -> dict:
    """The training state: parameters, optimiser state, steps done, the first step whose
    loss or gradient was not finite (0: none yet; steps count from 1) and skipped updates."""
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 - distinct buffers: the step donates the state
    return {"params": params, "opt_state": opt_state, "step": zero(), "nonfinite_step": zero(), "skipped": zero()}


def check_faults_config(faults: ml_collections.ConfigDict) -> None:
    """Refuses an unknown `config.faults.on_nonfinite`."""
    if faults.on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"config.faults.on_nonfinite: {faults.on_nonfinite!r} is not one of {NONFINITE_POLICIES}")


def remat_policy(config: ml_collections.ConfigDict) -> str:
    """config.remat ("none" when absent), the layers.rematted policy of a stage's trained
    blocks, refused with the field's name if not one of layers.REMAT_POLICIES."""
    policy = config.get("remat", "none")
    if policy not in layers.REMAT_POLICIES:
        raise ValueError(f"config.remat: {policy!r} is not one of {', '.join(layers.REMAT_POLICIES)}")
    return policy


def inject_nan(loss: jax.Array, step: jax.Array, faults: ml_collections.ConfigDict) -> jax.Array:
    """The loss, made NaN at step `faults.inject_nan_at` (1-based; 0: never) to test the guard.
    `step` is the number of steps done before this one."""
    if not faults.inject_nan_at:
        return loss
    return loss * jnp.where(step + 1 == faults.inject_nan_at, jnp.nan, 1.0)


def guard(state: dict, params: Any, opt_state: Any, metrics: dict, policy: str) -> tuple[dict, dict]:
    """Inside the jitted step: the next state, keeping the old parameters and optimiser
    state when this step's loss or gradient norm is not finite (and, under "stop", from the
    first such step on). Adds `skipped` (updates dropped so far) to the metrics."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    first_bad = state["nonfinite_step"]
    apply = finite if policy == "skip" else finite & (first_bad == 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
    step = state["step"] + 1
    new_state = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                 "step": step, "nonfinite_step": jnp.where((first_bad == 0) & ~finite, step, first_bad),
                 "skipped": state["skipped"] + (~apply).astype(jnp.int32)}
    return new_state, {**metrics, "skipped": new_state["skipped"]}


class StopOnSignal:
    """Context manager turning SIGTERM / SIGINT into a stop request read by `requested`.
    Handlers are installed only in the main thread (elsewhere signals cannot be caught)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop without waiting
        self.received = name
        print(f"{name} received: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def requested(self, step: int, sync_every: int) -> bool:
        """Whether to stop after `step`. With several processes they decide together every
        `sync_every` steps (a collective), so all stop at the same step."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % max(sync_every, 1):
            return False
        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        return bool(np.any(flags))


def warn_skipped(source) -> None:
    """Prints the data source's summary of skipped bad samples, if it has one to give."""
    report = getattr(source, "skip_report", lambda: None)()
    if report:
        print(f"warning: {report}", flush=True)


def _check_finite(state: dict, checkpointer, policy: str) -> None:
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad and policy == "stop":
        last = checkpointer.latest_step()
        where = f"the last good checkpoint is step {last} ({checkpointer.directory / str(last)})" if last else \
            "no checkpoint was saved before it"
        raise TrainingStopped(
            f"the loss or gradient became NaN/inf at step {bad}; training stopped with no update applied from that "
            f"step on; {where}. Lower the learning rate, check the input data, or set "
            "--config.faults.on_nonfinite=skip to drop such updates")


def run_steps(train_step: Callable[[dict, Mapping], tuple[dict, dict]], state: dict, batches: Iterator,
              start: int, config: ml_collections.ConfigDict, checkpointer, reporter, examples_per_step: int,
              data_position: Callable[[int], dict],
              on_log: Callable[[int, dict], None] | None = None) -> tuple[dict, int | None]:
    """Runs steps start+1 .. config.total_steps: `train_step(state, batch)` on each batch
    from `batches`, logging every `config.log_every` steps (then `on_log(step, state)`),
    checkpointing every `config.checkpoint_every` steps and at the end.

    Returns (state, None) when done, or (state, step) when a signal stopped it after `step`
    (a checkpoint of that step is then on disk). Raises TrainingStopped on a non-finite
    loss under the "stop" policy, before any checkpoint of the bad state is written."""
    try:
        return _steps(train_step, state, batches, start, config, checkpointer, reporter, examples_per_step,
                      data_position, on_log)
    except Exception:
        checkpointer.close(quiet=True)  # let a save in flight finish: it is the last good state
        raise


def _steps(train_step, state, batches, start, config, checkpointer, reporter, examples_per_step, data_position,
           on_log):
    policy = config.faults.on_nonfinite
    with StopOnSignal() as stop:
        for step in range(start + 1, config.total_steps + 1):
            state, metrics = train_step(state, next(batches))
            if step == start + 1:
                jax.block_until_ready(metrics)
                reporter.restart_clock(step)  # throughput and ETA without compilation
            last = step == config.total_steps
            if step % config.log_every == 0 or last:
                reporter.log(step, jax.device_get(metrics), examples_per_step)
                _check_finite(state, checkpointer, policy)
                if on_log is not None:
                    on_log(step, state)
            stopping = stop.requested(step, config.log_every)
            if step % config.checkpoint_every == 0 or last or stopping:
                _check_finite(state, checkpointer, policy)
                checkpointer.save(step, state, data_position(step), force=last or stopping)
            if stopping:
                checkpointer.close()
                if jax.process_index() == 0:
                    print(f"stopped by {stop.received or 'a signal on another process'} after step {step}: "
                          f"checkpoint {checkpointer.directory / str(step)}; run the same command again to resume",
                          flush=True)
                return state, step
    checkpointer.close()
    return state, None
