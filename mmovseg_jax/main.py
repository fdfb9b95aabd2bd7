"""Entry point: `python -m mmovseg_jax.main --config configs/FILE.py[:VARIANT] --workdir DIR`.

Every config field can be overridden on the command line as `--config.field=value`.
The config's `job` field selects what runs:

    cmu            CMU stage: SAR ViT aligned to a frozen RGB DINO (configs/cmu.py)
    def            DEF stage: the full model trained and scored on a setting (configs/def.py);
                   --mode eval only scores config.model.checkpoint on the test split;
                   --mode robustness scores it (and an RGB-only baseline) under clouds
    encoder_demo   DINO + CLIP encoders on a device mesh (configs/encoders.py)

Errors (a missing file, an unknown config field, a bad variant, a batch the devices do not
divide) end the run with one line on stderr and exit code 2; a stop during training (a
NaN loss, a failed checkpoint save) with exit code 1; --debug shows the traceback.
SIGTERM or Ctrl-C during training saves a checkpoint and exits 0: run the same command to
resume.
"""

from __future__ import annotations

import os
import sys

import importlib.util
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

JOBS = ("cmu", "def", "encoder_demo")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _load_config_module(path: str | Path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants_help() -> str:
    """The config files next to the package and their variants, for --help."""
    lines = ["", "Configs (--config configs/FILE.py:VARIANT; the first variant is the default):"]
    for path in sorted(CONFIGS.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            module = _load_config_module(path)
        except Exception:  # noqa: BLE001 - help must print whatever one config does
            continue
        variants = getattr(module, "VARIANTS", None) or getattr(module, "SETTINGS", ())
        summary = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        lines.append(f"  configs/{path.name:<12} {summary}")
        if variants:
            lines.append(f"      variants: {', '.join(variants)}")
    return "\n".join(lines) + "\n"


__doc__ += variants_help()

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


def unknown_override(argv: list[str]) -> str | None:
    """The first `--config.a.b=...` of argv that names no field of the config, as a message
    listing the valid fields at that level; None when all exist (or the config won't load)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    if spec is None:
        return None
    path, _, variant = spec.partition(":")
    try:
        config = _load_config_module(path).get_config(variant or None)
    except Exception:  # noqa: BLE001 - the caller reports the original error
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(["config", *parts[:i]])
                valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else \
                    f"none ({where} is a {type(node).__name__}, not a group)"
                return f"--config.{key}: {where} has no field {part!r}; valid fields: {valid}"
            node = node[part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config errors (bad file or variant, unknown field, bad value)
    as one line and exit code 2 (--debug: the traceback)."""
    try:
        rest = flags.FLAGS(argv)
        spec = flags.FLAGS["config"].config_filename if flags.FLAGS["config"].present else None
        if spec and not Path(spec.split(":")[0]).is_file():
            known = ", ".join(f"configs/{p.name}" for p in sorted(CONFIGS.glob("[!_]*.py")))
            print(f"error: --config: {spec.split(':')[0]}: no such file (the configs: {known})", file=sys.stderr)
            sys.exit(2)
        return rest
    except Exception as e:  # noqa: BLE001 - config files raise whatever they raise
        if "--debug" in argv:
            raise
        message = unknown_override(argv)
        if message is None:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            # A config file's own error arrives wrapped with its traceback: keep its last line.
            message = f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}" if len(lines) > 1 else \
                (lines[0] if lines else type(e).__name__)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


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
    from mmovseg_jax.train.checkpointing import CheckpointError
    from mmovseg_jax.train.loop import TrainingStopped

    try:
        run_job(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError, TrainingStopped, CheckpointError) as e:
        if _DEBUG.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, CheckpointError):
            # Orbax's writer threads would print their own tracebacks while Python shuts down.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        sys.exit(1 if isinstance(e, TrainingStopped) else 2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
