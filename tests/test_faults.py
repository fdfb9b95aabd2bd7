"""Faults survived during training (CMU stage, small config): SIGTERM and Ctrl-C save a
checkpoint and exit 0; SIGKILL in the middle of an asynchronous save leaves the last
complete checkpoint, which resume picks; a NaN loss stops with the step (or is skipped);
a save that cannot be written (a file-size limit standing in for a full disk) fails with
one line and leaves the previous checkpoint intact. Every resumed run logs the losses of
an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_cmu import ROOT, _command, _env, _metrics, _run

STEPS = ["--config.total_steps=40", "--config.checkpoint_every=10"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[dict]:
    """Metrics of the uninterrupted 40-step run."""
    workdir = tmp_path_factory.mktemp("straight")
    _run(workdir, *STEPS)
    return _metrics(workdir)


def _same_losses(got: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in reference]
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in reference], atol=1e-6, rtol=0)


def _wait_for(predicate, proc, seconds: float = 300) -> bool:
    deadline = time.time() + seconds
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    return predicate()


def _logged_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_matches(tmp_path, straight, sig):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_command(workdir, *STEPS), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: _logged_step(workdir) >= 3, proc), "training never started"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"{sig.name} received" in err
    stopped = int(out.split("after step ")[1].split(":")[0])
    assert stopped < 40, out[-1000:]
    assert (workdir / "checkpoints" / str(stopped)).is_dir()
    assert not (workdir / "sar_encoder").exists()  # stopped before the end: nothing exported

    resumed = _run(workdir, *STEPS)
    assert f"resumed from {workdir / 'checkpoints' / str(stopped)}" in resumed.stdout
    _same_losses(_metrics(workdir), straight)


def test_sigkill_during_async_save_resumes_from_last_complete(tmp_path, straight):
    """Checkpoints every step; SIGKILL while one is being written (its temporary folder
    exists) after at least one completed."""
    workdir = tmp_path / "run"
    every_step = ["--config.total_steps=40", "--config.checkpoint_every=1"]
    proc = subprocess.Popen(_command(workdir, *every_step), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    folder = workdir / "checkpoints"

    def mid_save() -> bool:
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        return any(n.isdigit() and int(n) >= 3 for n in names) and any("tmp" in n for n in names)

    caught = _wait_for(mid_save, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert caught, "never saw a save in progress"
    complete = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    resumed = _run(workdir, *every_step)
    assert f"resumed from {folder / str(complete)}" in resumed.stdout
    assert not any("tmp" in p.name for p in folder.iterdir())  # the torn save was cleaned up
    _same_losses(_metrics(workdir), straight)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, straight):
    workdir = tmp_path / "run"
    result = subprocess.run(_command(workdir, *STEPS, "--config.faults.inject_nan_at=15"), cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "NaN/inf at step 15" in error[0], result.stderr[-2000:]
    assert f"last good checkpoint is step 10 ({workdir / 'checkpoints' / '10'})" in error[0]
    assert "Traceback" not in result.stderr
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [10]
    # The same command without the fault resumes from step 10 and matches the clean run.
    resumed = _run(workdir, *STEPS)
    assert "resumed from" in resumed.stdout
    _same_losses(_metrics(workdir), straight)


def test_nan_loss_skipped_by_config(tmp_path, straight):
    workdir = tmp_path / "run"
    _run(workdir, *STEPS, "--config.faults.inject_nan_at=15", "--config.faults.on_nonfinite=skip")
    got = _metrics(workdir)
    assert np.isnan(got[14]["loss"]) and got[14]["skipped"] == 1 and got[-1]["skipped"] == 1
    _same_losses(got[:14], straight[:14])  # identical before the fault
    assert all(np.isfinite(m["loss"]) for m in got[15:])


def _with_file_size_limit(command: list[str], limit: int = 100_000) -> list[str]:
    """`command` run under a file-size limit of `limit` bytes, set by a small Python that
    then execs it (rlimits and an ignored signal survive exec). Not a preexec_fn: that runs
    Python between fork and exec in this multithreaded (JAX) process, which can deadlock."""
    setup = ("import os, resource, signal, sys; "
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # a write past the limit fails with EFBIG instead
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
             "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", setup, *command]


def test_failed_save_is_loud_and_keeps_the_previous_checkpoint(tmp_path, straight):
    """A checkpoint that cannot be written (files over 100 kB refused, as on a full disk)."""
    workdir = tmp_path / "run"
    # A step-10 checkpoint of the 40-step schedule (a NaN at step 12 stops the run there).
    first = subprocess.run(_command(workdir, *STEPS, "--config.faults.inject_nan_at=12"), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
    listing = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert listing == ["10"], (listing, first.stderr[-3000:])
    result = subprocess.run(_with_file_size_limit(_command(workdir, *STEPS)), cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "saving checkpoint step 20" in error[0] and "File too large" in error[0], \
        result.stderr[-3000:]
    assert f"step 10 ({workdir / 'checkpoints' / '10'}) is intact" in error[0], error[0]
    listing = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert [name for name in listing if name.isdigit()] == ["10"], listing
    # With room again, the run resumes from step 10 and matches the uninterrupted one.
    resumed = _run(workdir, *STEPS)
    assert f"resumed from {workdir / 'checkpoints' / '10'}" in resumed.stdout
    _same_losses(_metrics(workdir), straight)


@pytest.mark.parametrize("tail", [
    ': Failed to write 166755 bytes to file 4: File too large [os_error_code=\'27\']',
    # Opening a zarr array puts the TensorStore spec (with brackets inside) before the OS code.
    ': Failed to write 166755 bytes to file 4: File too large [tensorstore_spec=\'{"metadata":{"chunks":[64,64]}}\']'
    ' [os_error_code=\'27\']',
    ': Failed to write 166755 bytes to file 4 [os_error_code=27] [source locations=\'tensorstore/util/file.cc:10\']',
    ': write failed: File too large',  # no code at all: the OS's text is recognised
])
def test_failed_save_names_the_os_error_in_any_tensorstore_form(tmp_path, tail):
    from mmovseg_jax.train.checkpointing import Checkpointer
    error = ValueError('OUT_OF_RANGE: Error opening "zarr" driver: Error writing "x/.zarray" in OCDBT database' + tail)
    message = str(Checkpointer(tmp_path)._failed(20, error))
    assert "File too large, errno 27" in message and "saving checkpoint step 20" in message, message
    assert message.endswith("there is no earlier checkpoint"), message


def test_failed_save_reason_from_an_os_error_in_the_chain_or_the_message_ends():
    from mmovseg_jax.train.checkpointing import failure_reason
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as cause:
            raise RuntimeError("commit of step 20 failed") from cause
    except RuntimeError as wrapped:
        assert failure_reason(wrapped) == "No space left on device, errno 28"
    # nothing OS-like: the type, and the start and end of a long message (where the cause usually is)
    long = ValueError("INTERNAL: " + "spec " * 100 + "the real cause")
    reason = failure_reason(long)
    assert reason.startswith("ValueError: INTERNAL: spec") and reason.endswith("the real cause"), reason
    assert len(reason) < 330
