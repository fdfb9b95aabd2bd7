"""Cloud augmentation in DEF training and the robustness sweep on the synthetic world:
as clouds thicken, the RGB-only baseline collapses and the fused model holds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmovseg_jax.train import def_stage

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--config.data.num_records=256", "--config.eval.num_records=16", "--config.log_every=50",
         "--config.tensorboard=False", "--config.clouds.prob=0.5", "--config.clouds.presets=('big',)"]


def _run(workdir, *extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "mmovseg_jax.main", "--config", "configs/def.py", f"--workdir={workdir}", *extra]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_cloud_augment_clouds_a_share_of_the_batch_and_leaves_the_rest():
    rgb = jnp.asarray(np.random.default_rng(0).integers(0, 120, (16, 32, 32, 3)), jnp.uint8)
    out = jax.jit(lambda x, k: def_stage.cloud_augment(x, k, 0.5, ("big",)))(rgb, jax.random.key(3))
    changed = np.asarray(jnp.any(out != rgb.astype(jnp.float32), axis=(1, 2, 3)))
    assert 0 < changed.sum() < 16  # some tiles clouded, some untouched
    assert float(out.min()) >= 0 and float(out.max()) <= 255
    again = jax.jit(lambda x, k: def_stage.cloud_augment(x, k, 0.5, ("big",)))(rgb, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    with pytest.raises(ValueError, match="config.clouds.presets"):
        def_stage.cloud_augment(rgb, jax.random.key(0), 0.5, ("cumulus",))


@pytest.mark.slow
def test_fused_model_holds_up_under_opaque_clouds(tmp_path):
    _run(tmp_path / "fused", "--config.total_steps=300", *SHORT)
    _run(tmp_path / "rgb", "--config.total_steps=300", "--config.model.use_sar=False", *SHORT)
    result = _run(tmp_path / "sweep", "--mode=robustness", f"--config.model.checkpoint={tmp_path / 'fused' / 'model'}",
                  f"--config.robustness.baseline_checkpoint={tmp_path / 'rgb' / 'model'}",
                  "--config.robustness.opacities=(0.0, 0.5, 1.0)", "--config.eval.num_records=32")
    table = json.loads((tmp_path / "sweep" / "robustness.json").read_text())
    assert (tmp_path / "sweep" / "robustness.png").stat().st_size > 1000
    print(result.stdout[-600:])
    fused = {row["opacity"]: row["mIoU_seen"] for row in table["scores"]["big"]["fused"]}
    rgb_only = {row["opacity"]: row["mIoU_seen"] for row in table["scores"]["big"]["rgb_only"]}
    # 300 steps leave the models part-trained, so the scores move with the seed and with
    # XLA's rounding. Measured on this CPU, mIoU at opacity 0 / 1:
    #   seed 0: fused 37.0 / 32.3, RGB-only 35.5 / 6.6     seed 1: 33.4 / 26.2, 27.5 / 6.0
    #   seed 2: fused 40.6 / 31.4, RGB-only 34.6 / 5.0
    #   seed 0, earlier code: 60.4 / 46.4, 18.3 / 9.0; the reverted checkpointed GELU: - / 20.3, - / 7.5
    # The best constant prediction scores about 8. Fused at opacity 1 was 2.7 to 6.3 times
    # RGB-only, so the margin is a ratio (a fixed +15 points failed on the last run above).
    assert fused[1.0] > 2 * max(rgb_only[1.0], 8.0)  # opaque clouds: only SAR still sees the ground
    kept_fused, kept_rgb = fused[1.0] / fused[0.0], rgb_only[1.0] / rgb_only[0.0]
    assert kept_rgb < 0.6  # the RGB-only model loses most of what it had
    assert kept_fused > kept_rgb + 0.15  # the fused one far less
