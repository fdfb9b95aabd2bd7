"""DEF training end to end: sharded steps equal one device, what trains and at which
rate, evaluation of the exported model, and (shortened) learning on the synthetic world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mmovseg_jax.models import mmovseg
from mmovseg_jax.train import def_stage, optim

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.data.num_records=32", "--config.eval.num_records=8", "--config.log_every=1",
         "--config.tensorboard=False", "--config.global_batch_size=8"]


def _run(workdir, *extra, devices: int = 1, config: str = "configs/def.py") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "mmovseg_jax.main", "--config", config, f"--workdir={workdir}",
           *SMALL, *extra]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(workdir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_sharded_meshes_equal_one_device_resume_and_eval_of_the_export(tmp_path):
    """8 devices (data 8; data 2 x fsdp 4 with the frozen encoders split) = 1 device; a run
    resumed from its step-3 checkpoint logs the uninterrupted run's losses; the exported
    model, scored again with --mode eval, gives the end-of-training scores."""
    # a constant schedule without warmup: the same learning rates for 3 and 5 steps
    constant = ("--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0")
    _run(tmp_path / "one", "--config.total_steps=5", *constant)
    eight = _run(tmp_path / "eight", "--config.total_steps=3", *constant, devices=8)
    fsdp = _run(tmp_path / "fsdp", "--config.total_steps=3", *constant, "--config.mesh.fsdp=4",
                "--config.mesh.shard_frozen=True", devices=8)
    assert "over 8 cpu devices" in eight.stdout and "{'data': 2, 'fsdp': 4}" in fsdp.stdout
    one = _losses(tmp_path / "one")
    assert len(one) == 5 and one[0] != one[-1]
    np.testing.assert_allclose(_losses(tmp_path / "eight"), one[:3], atol=1e-5, rtol=0)
    np.testing.assert_allclose(_losses(tmp_path / "fsdp"), one[:3], atol=1e-5, rtol=0)
    _run(tmp_path / "resumed", "--config.total_steps=3", *constant)
    resumed = _run(tmp_path / "resumed", "--config.total_steps=5", *constant)
    assert "resumed from" in resumed.stdout
    np.testing.assert_allclose(_losses(tmp_path / "resumed"), one, atol=1e-6, rtol=0)

    trained = json.loads((tmp_path / "one" / "eval_test.json").read_text())
    assert (tmp_path / "one" / "eval_test.md").is_file()
    _run(tmp_path / "eval", "--mode=eval", *constant, f"--config.model.checkpoint={tmp_path / 'one' / 'model'}")
    again = json.loads((tmp_path / "eval" / "eval_test.json").read_text())
    assert again["class_names"] == list(trained["class_names"])
    assert again["confusion_matrix"] == trained["confusion_matrix"]
    assert again["precision"] == trained["precision"] == "float32"
    assert not (tmp_path / "eval" / "checkpoints").exists()

    # the same model scored in static float8: calibrated on 3 training tiles, then frozen
    static = _run(tmp_path / "fp8", "--mode=eval", "--config.eval.fp8=static", "--config.eval.fp8_calibration_tiles=3",
                  f"--config.model.checkpoint={tmp_path / 'one' / 'model'}")
    assert "eval in float8, static scales from 3 train tiles" in static.stdout, static.stdout[-2000:]
    in_fp8 = json.loads((tmp_path / "fp8" / "eval_test.json").read_text())
    assert in_fp8["precision"] == "bfloat16, float8 static" and in_fp8["tiles"] == trained["tiles"]
    assert np.sum(in_fp8["confusion_matrix"]) == np.sum(trained["confusion_matrix"])
    assert "(test, bfloat16, float8 static)" in (tmp_path / "fp8" / "eval_test.md").read_text()


def test_a_paper_setting_on_its_prepared_layout(tmp_path):
    """DDHR-SK -> DDHR-CH read from the authors' folder layout (JPEG optical/SAR, PNG labels),
    trained with the training class list and scored with DDHR-CH's own list and order."""
    from test_data_segmentation import make_setting_root

    from mmovseg_jax.data.benchmarks import SETTINGS

    root = make_setting_root(tmp_path / "data", SETTINGS["ddhr_sk_to_ch"], n=8)
    result = _run(tmp_path / "run", "--config.model.variant=tiny",
                  "--config.model.require_pretrained=False", "--config.model.dtype=float32",
                  "--config.data.crop_size=128", f"--config.data.root={root}", "--config.total_steps=2",
                  "--config.data.worker_count=0", config="configs/def.py:ddhr_sk_to_ch")
    assert "classes ('city', 'forest', 'farmland') -> ('city', 'road', 'farmland', 'forest', 'water')" in result.stdout
    scores = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    assert scores["class_names"] == ["city", "road", "farmland", "forest", "water"]
    assert scores["unseen_classes"] == ["road", "water"] and scores["tiles"] == 8
    assert sum(map(sum, scores["confusion_matrix"])) == 8 * (24 * 32 - 3)  # every labelled pixel, ignore left out


def test_paper_settings_refuse_random_encoders(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "mmovseg_jax.main", "--config=configs/def.py:oem_thin",
                             f"--workdir={tmp_path}", f"--config.data.root={tmp_path}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config.model.clip_checkpoint is empty" in result.stderr


def _trainable_names(finetune: str) -> list[str]:
    model = nnx.eval_shape(lambda: mmovseg.Model(mmovseg.VARIANTS["tiny"], rngs=nnx.Rngs(0)))
    _, trainable, _ = nnx.split(model, def_stage.is_trainable(finetune), ...)
    return [".".join(map(str, path)) for path, _ in nnx.to_flat_state(trainable)]


def test_what_trains():
    qv = _trainable_names("qv")
    clip_qv = [n for n in qv if n.startswith("clip.")]
    assert clip_qv and all(n.endswith(("query.kernel", "value.kernel")) for n in clip_qv)
    assert any(n.startswith("clip.text.") for n in clip_qv) and any(n.startswith("clip.vision.") for n in clip_qv)
    assert not any(n.startswith(("rgb_dino.", "sar_dino.")) for n in qv)
    assert any(n.startswith("head.") for n in qv) and any(n.startswith("sar_levels.") for n in qv)
    assert not any(n.startswith("clip.") for n in _trainable_names("frozen"))
    full = [n for n in _trainable_names("full") if n.startswith("clip.")]
    assert len(full) > len(clip_qv) and all(".blocks." in n for n in full)
    with pytest.raises(ValueError, match="clip_finetune"):
        def_stage.is_trainable("everything")


def test_clip_trains_at_its_learning_rate_multiplier():
    cfg = ml_collections.ConfigDict(dict(name="adamw", lr=1e-2, weight_decay=0.0, b1=0.9, b2=0.999, warmup_steps=0,
                                         schedule="constant", grad_clip=0.0))
    tx, _ = optim.make(cfg, 10, def_stage.param_groups(0.01))
    params = {"clip": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
    grads = jax.tree.map(lambda x: 0.5 * x, params)
    _, state = tx.update(grads, tx.init(params), params)  # step 0: the warmup's lr is 0
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["clip"]["w"], 0.01 * updates["head"]["w"], rtol=1e-6)
    assert float(jnp.abs(updates["head"]["w"]).max()) > 0


@pytest.mark.slow
def test_synthetic_default_learns(tmp_path):
    """A shortened default run: seen-class mIoU clearly above the best constant prediction."""
    _run(tmp_path / "run", "--config.total_steps=200", "--config.data.num_records=256", "--config.eval.num_records=48",
         "--config.log_every=50")
    scores = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    rows = {r["name"]: r for r in scores["per_class"]}
    seen = [c for c in scores["seen_classes"] if rows[c]["gt_pixels"] > 0]
    total = sum(r["gt_pixels"] for r in rows.values())
    # predicting one class everywhere: IoU gt_c / total for it, 0 for the others
    constant = max(100 * rows[c]["gt_pixels"] / total for c in seen) / len(seen)
    print(f"mIoU_seen {scores['mIoU_seen']:.1f} vs best constant {constant:.1f}")
    assert scores["mIoU_seen"] > constant + 15


def _tensorboard_images(folder: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """tag -> [(step, (H, W, 3) uint8)] from the TFRecord event files in `folder`."""
    import io
    import struct

    from PIL import Image
    from tensorboardX.proto import event_pb2

    images: dict = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    pixels = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))
                    images.setdefault(value.tag, []).append((event.step, pixels))
    return images


def test_example_predictions_in_tensorboard_and_nan_stop(tmp_path):
    """Example images land in TensorBoard at the image steps; a NaN loss at step 3 stops
    the DEF run with exit 1 and the step, after the step-2 checkpoint."""
    result = subprocess.run(
        [sys.executable, "-m", "mmovseg_jax.main", "--config", "configs/def.py", f"--workdir={tmp_path}", *SMALL,
         "--config.tensorboard=True", "--config.total_steps=4", "--config.checkpoint_every=2",
         "--config.image_every=2", "--config.image_tiles=2", "--config.faults.inject_nan_at=3"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "NaN/inf at step 3" in result.stderr and "last good checkpoint is step 2" in result.stderr
    images = _tensorboard_images(tmp_path / "tb")["examples/prediction"]
    assert [step for step, _ in images] == [2]  # step 4 was never reached
    grid = images[0][1]
    tile = 128  # the synthetic test tiles (config.data.tile_size)
    assert grid.shape == (2 * tile, 4 * tile, 3)
    from mmovseg_jax.data import benchmarks

    record = benchmarks.build_source("synthetic", "test", None, num_records=8, size=tile, seed=0)[0]
    np.testing.assert_array_equal(grid[:tile, :tile], record["rgb"])  # first panel: the tile itself
    assert len(np.unique(grid[:tile, 3 * tile:].reshape(-1, 3), axis=0)) <= 6  # prediction: palette colours
