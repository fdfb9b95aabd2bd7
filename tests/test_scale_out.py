"""FSDP memory: with fsdp = 8 each device holds about 1/8 of the trainable state."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp8_holds_an_eighth_of_the_state_per_device():
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "tests/scripts/fsdp_memory.py"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    replicated, fsdp8, full = sizes["1"], sizes["8"], sizes["full"]
    print(f"state per device: replicated {replicated} B, fsdp=8 {fsdp8} B ({fsdp8 / replicated:.3f}), whole {full} B")
    assert abs(replicated - full) <= 0.01 * full  # replicated: every device holds all of it
    assert 1 / 8 <= fsdp8 / replicated < 0.15  # small vectors stay replicated: slightly above 1/8


def test_partition_rules_by_name():
    import jax
    import numpy as np
    import pytest

    from mmovseg_jax.train import sharding

    mesh = sharding.make_mesh(-1, 1)
    tree = {"student": {"pos_embed": np.zeros((65, 256)), "fc1": {"kernel": np.zeros((256, 1024))}},
            "mu": {"student": {"fc1": {"kernel": np.zeros((256, 1024))}}}}
    rules = (("pos_embed", "replicated"), (r"fc1\.kernel$", "None,fsdp"))
    out = sharding.state_shardings(tree, mesh, rules)
    assert out["student"]["pos_embed"].spec == jax.sharding.PartitionSpec()
    assert out["student"]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert out["mu"]["student"]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp")  # its moments too
    with pytest.raises(ValueError, match="config.mesh.rules"):
        sharding.state_shardings(tree, mesh, (("fc1", "fsdp"),))  # one entry for a 2-d array
    with pytest.raises(ValueError, match="config.mesh.rules"):
        sharding.state_shardings(tree, mesh, (("fc1", "model,None"),))  # no such mesh axis
