"""Entry point: `python -m mmovseg_jax.main --config configs/FILE.py[:VARIANT] --workdir DIR`.

Every config field can be overridden on the command line as `--config.field=value`.
The config's `job` field selects what runs:

    cmu            CMU stage: SAR ViT aligned to a frozen RGB DINO (configs/cmu.py)
    def            DEF stage: the full model trained and scored on a setting (configs/def.py);
                   --mode eval only scores config.model.checkpoint on the test split;
                   --mode robustness scores it (and an RGB-only baseline) under clouds
    encoder_demo   DINO + CLIP encoders on a device mesh (configs/encoders.py)
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

JOBS = ("cmu", "def", "encoder_demo")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally FILE.py:VARIANT.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mmovseg_jax", "Where outputs are written.")
_MODE = flags.DEFINE_enum("mode", None, ["train", "eval", "robustness"], "Overrides config.mode (def job): "
                          "train then evaluate; only evaluate; or evaluate under a ladder of cloud opacities.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks of errors.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 in a multi-host run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank in a multi-host run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with JAX's cluster "
                                 "auto-detection (TPU pod slices, SLURM).")


def init_distributed() -> None:
    """Joins a multi-host run: explicit --coordinator/--num_processes/--process_id, or JAX's
    auto-detection on a TPU pod slice or under SLURM with several tasks."""
    import jax

    if _COORDINATOR.value:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise app.UsageError("--coordinator needs --num_processes and --process_id")
        # Collectives between CPU processes (local testing); no effect on accelerator backends.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def run_job(config, workdir: str) -> dict:
    """Runs the job the config names; returns its summary."""
    job = config.get("job")
    if job == "cmu":
        from mmovseg_jax.train import cmu

        return cmu.run(config, workdir)
    if job == "def":
        from mmovseg_jax.train import def_stage

        return def_stage.run(config, workdir)
    if job == "encoder_demo":
        from mmovseg_jax import encoder_demo

        return encoder_demo.run(config, workdir)
    raise ValueError(f"config.job: {job!r} is not one of {JOBS}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/cmu.py")
    if not _DEBUG.value:
        logging.set_verbosity(logging.WARNING)  # keep library INFO lines (Orbax saves, backends) out of the progress
    init_distributed()
    config = _CONFIG.value
    if _MODE.value:
        if "mode" not in config:
            raise app.UsageError(f"--mode applies to jobs with a mode field, not {config.get('job')!r}")
        config.mode = _MODE.value
    try:
        run_job(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:
        if _DEBUG.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
