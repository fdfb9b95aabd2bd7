"""CMU training end to end: sharded steps equal one device, exact resume after a kill,
retrieval gain over the initialisation, export to PyTorch, config variants."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import cmu as cmu_config

ROOT = Path(__file__).resolve().parents[1]
# A small, fast run: 32 px crops of 48 px synthetic tiles, a 2-block ViT.
SMALL = ["--config.model.width=64", "--config.model.depth=2", "--config.model.num_heads=2",
         "--config.model.image_size=32", "--config.blocks=(0,1)", "--config.data.tile_size=48",
         "--config.data.crop_size=32", "--config.data.num_records=160", "--config.eval.num_pairs=32",
         "--config.eval.batch_size=16", "--config.global_batch_size=16", "--config.log_every=1",
         "--config.tensorboard=False"]


def _command(workdir, *extra, small: bool = True):
    return [sys.executable, "-m", "mmovseg_jax.main", "--config", "configs/cmu.py", f"--workdir={workdir}",
            *(SMALL if small else []), *extra]


def _env(devices: int = 1) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _run(workdir, *extra, devices: int = 1, small: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(workdir, *extra, small=small), cwd=ROOT, env=_env(devices), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _run_two_processes(workdir, *extra) -> list[str]:
    """Runs main in 2 processes x 4 CPU devices joined by jax.distributed on loopback;
    returns each process's output (stdout and stderr)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_command(workdir, *extra, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                       f"--process_id={i}"),
                              cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:  # a process left waiting for its peer would spin on through the rest of the suite
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()
            if "loss" in line]


@pytest.mark.parametrize("loss", ["--config.loss.embedding=cls", "--config.loss.embedding=dense",
                                  "--config.loss.kind=l1"])
def test_eight_devices_equal_one(tmp_path, loss):
    """The same global batch on an 8-device mesh gives the single-device losses."""
    one = _run(tmp_path / "one", "--config.total_steps=4", loss, devices=1)
    eight = _run(tmp_path / "eight", "--config.total_steps=4", loss, devices=8)
    assert "over 8 cpu devices" in eight.stdout
    l1 = [m["loss"] for m in _metrics(tmp_path / "one")]
    l8 = [m["loss"] for m in _metrics(tmp_path / "eight")]
    assert len(l1) == len(l8) == 4
    np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=0)
    assert l1[0] != l1[-1]  # training moved


def test_fsdp_mesh_equals_one_device(tmp_path):
    """data 2 x fsdp 4 (parameters, optimiser state and teacher split) = one device."""
    _run(tmp_path / "one", "--config.total_steps=3", devices=1)
    fsdp = _run(tmp_path / "fsdp", "--config.total_steps=3", "--config.mesh.fsdp=4", "--config.mesh.shard_teacher=True",
                "--config.mesh.rules=(('pos_embed', 'replicated'), ('fc1.kernel', 'None,fsdp'))", devices=8)
    assert "{'data': 2, 'fsdp': 4}" in fsdp.stdout
    share = int(fsdp.stdout.split("% split over fsdp")[0].rsplit(" ", 1)[-1])
    assert share > 50, fsdp.stdout
    np.testing.assert_allclose([m["loss"] for m in _metrics(tmp_path / "fsdp")],
                               [m["loss"] for m in _metrics(tmp_path / "one")], atol=1e-5, rtol=0)


def test_resume_after_kill_reproduces_uninterrupted_run(tmp_path):
    steps = ["--config.total_steps=30", "--config.checkpoint_every=10"]
    _run(tmp_path / "straight", *steps)
    reference = _metrics(tmp_path / "straight")

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_command(workdir, *steps), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = workdir / "checkpoints" / "10"
    deadline = time.time() + 300
    while not checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_dir(), "the run never wrote its step-10 checkpoint"

    resumed = _run(workdir, *steps)
    assert "resumed from" in resumed.stdout
    got = _metrics(workdir)
    assert [m["step"] for m in got] == [m["step"] for m in reference]
    for a, b in zip(got, reference):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-6)
    final = json.loads((workdir / "retrieval.json").read_text())["retrieval_final"]
    expected = json.loads((tmp_path / "straight" / "retrieval.json").read_text())["retrieval_final"]
    assert final == expected


@pytest.mark.slow
def test_default_run_beats_its_initialisation(tmp_path):
    """The embedded default, shortened: retrieval well above its initialisation and chance."""
    result = _run(tmp_path, "--config.total_steps=150", "--config.data.num_records=1280",
                  "--config.tensorboard=False", small=False)
    summary = json.loads((tmp_path / "retrieval.json").read_text())
    before, after = summary["retrieval_init"], summary["retrieval_final"]
    print(result.stdout[-800:])
    assert after["candidates"] == 256
    assert after["top1"] >= before["top1"] + 0.4
    assert after["top5"] >= before["top5"] + 0.4
    assert after["top1"] > 50 * after["chance_top1"]


def test_export_and_convert_to_torch(tmp_path):
    _run(tmp_path / "run", "--config.total_steps=2")
    from convert.to_torch import convert_to_torch
    from mmovseg_jax.models import dino

    model = dino.load(tmp_path / "run" / "sar_encoder")
    assert model.config.width == 64 and model.config.depth == 2
    out = convert_to_torch(tmp_path / "run" / "sar_encoder", tmp_path / "sar.pth")
    import torch

    state = torch.load(out, weights_only=True)
    assert "blocks.1.attn.qkv.weight" in state and state["pos_embed"].shape == (1, 17, 64)


@pytest.mark.parametrize("variant", cmu_config.VARIANTS)
def test_variants_build(variant):
    config = cmu_config.get_config(variant if variant != "default" else None)
    assert config.job == "cmu" and config.loss.kind == "infonce"
    assert config.loss.embedding == ("cls" if variant == "large_batch" else "dense")
    if variant == "paper":
        assert config.model.variant == "B/16" and config.global_batch_size == 8
        assert config.optimizer.lr == 3e-4 and config.optimizer.weight_decay == 1e-4
        assert tuple(config.blocks) == (3, 7, 11)
    if variant == "official":
        assert config.model.variant == "B/8" and config.model.image_size == 384


def test_real_data_variant_without_paths_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mmovseg_jax.main", "--config", "configs/cmu.py:paper",
                             f"--workdir={tmp_path}", "--config.teacher_required=False", "--config.model.variant=", "--config.model.width=64",
                             "--config.model.depth=1", "--config.model.num_heads=1", "--config.model.image_size=32"],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "config.data.spacenet6_root" in result.stderr and "Traceback" not in result.stderr


def test_two_processes_equal_one_process_and_their_checkpoint_restores_on_other_meshes(tmp_path):
    """jax.distributed on loopback: 2 processes x 4 CPU devices give the losses of 1 x 8;
    their step-3 checkpoint (parameters, optimiser state, input position) restores in
    1 process x 8 devices and in 1 x 4 and continues as the uninterrupted 1 x 8 run."""
    import shutil

    # a constant learning rate without warmup: the same schedule for 3 and 6 steps
    constant = ("--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0")
    _run_two_processes(tmp_path / "multi", "--config.total_steps=3", *constant)
    _run(tmp_path / "single", "--config.total_steps=6", *constant, devices=8)
    multi = [m["loss"] for m in _metrics(tmp_path / "multi")]
    single = [m["loss"] for m in _metrics(tmp_path / "single")]
    assert len(multi) == 3  # written once, by process 0
    np.testing.assert_allclose(multi, single[:3], atol=1e-5, rtol=0)
    for devices in (8, 4):
        workdir = tmp_path / f"restored_on_{devices}"
        shutil.copytree(tmp_path / "multi", workdir)
        resumed = _run(workdir, "--config.total_steps=6", *constant, devices=devices)
        assert "resumed from" in resumed.stdout and f"over {devices} cpu devices" in resumed.stdout
        np.testing.assert_allclose([m["loss"] for m in _metrics(workdir)], single, atol=1e-5, rtol=0)
