"""The main entry point's encoder demo, on one device and on 8 fake CPU devices, and the
encoder benchmark at toy size (so neither can rot)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import encoders
from mmovseg_jax import main as entry

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.image_size=64", "--config.batch_size=8", "--config.timed_steps=1",
        "--config.dino.depth=2", "--config.clip.depth=1", "--config.dino_blocks=(0,1)"]


def _run_cli(workdir, *extra, devices=1):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "mmovseg_jax.main", "--config", "configs/encoders.py",
                           f"--workdir={workdir}", *TINY, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_demo_in_process(tmp_path):
    config = encoders.get_config()
    config.image_size, config.batch_size, config.timed_steps = 64, 2, 1
    config.dino.depth, config.clip.depth, config.dino_blocks = 2, 1, (0, -1)
    summary = entry.run_job(config, str(tmp_path))
    assert summary["dino_feature_shapes"] == [[2, 17, 384], [2, 17, 384]]
    assert summary["clip_similarity_shape"] == [2, 16, 5]
    assert sum(summary["label_fractions"].values()) == pytest.approx(1.0)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_demo_sharded_over_8_devices_matches_one_device(tmp_path):
    one = _run_cli(tmp_path / "one", devices=1)
    eight = _run_cli(tmp_path / "eight", devices=8)
    assert one.returncode == 0, one.stderr
    assert eight.returncode == 0, eight.stderr
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s8 = json.loads((tmp_path / "eight" / "summary.json").read_text())
    assert s8["devices"] == 8 and s8["pixels_sharding"] == ["data", "fsdp"]
    # Same seeds and weights: the sharded batch labels the patches as the unsharded one
    # (to within a patch or two that may flip on a near tie).
    for name, fraction in s1["label_fractions"].items():
        assert s8["label_fractions"][name] == pytest.approx(fraction, abs=2 / (8 * 16))
    assert s1["dino_feature_shapes"] == s8["dino_feature_shapes"]


def test_demo_refuses_bad_config(tmp_path):
    dup = _run_cli(tmp_path, "--config.classes=water,water")
    assert dup.returncode == 2
    assert "config.classes" in dup.stderr and "Traceback" not in dup.stderr
    uneven = _run_cli(tmp_path, "--config.batch_size=3", devices=2)
    assert uneven.returncode == 2 and "not divisible by the 2 devices" in uneven.stderr


def test_encoder_benchmark_smoke():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import encoder_forward

    rows = encoder_forward.main(["--models", "dino_s16,clip_b16_dense", "--size", "32", "--batch", "2",
                                 "--steps", "1", "--depth", "1", "--torch"])
    assert {(r["model"], r["impl"]) for r in rows} == {("dino_s16", "jax"), ("dino_s16", "torch"),
                                                        ("clip_b16_dense", "jax")}
    assert all(r["img_s"] > 0 and r["tflops"] > 0 for r in rows)
