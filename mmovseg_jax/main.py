"""Entry point: `python -m mmovseg_jax.main --config configs/FILE.py[:VARIANT] --workdir DIR`.

Every config field can be overridden on the command line as `--config.field=value`.
The config's `job` field selects what runs:

    encoder_demo   DINO + CLIP encoders on a device mesh (configs/encoders.py)
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

JOBS = ("encoder_demo",)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally FILE.py:VARIANT.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mmovseg_jax", "Where outputs are written.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks of errors.")


def run_job(config, workdir: str) -> dict:
    """Runs the job the config names; returns its summary."""
    job = config.get("job")
    if job == "encoder_demo":
        from mmovseg_jax import encoder_demo

        return encoder_demo.run(config, workdir)
    raise ValueError(f"config.job: {job!r} is not one of {JOBS}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/encoders.py")
    try:
        run_job(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:
        if _DEBUG.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
