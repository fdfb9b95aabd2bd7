"""The main CLI refuses bad configs with one line naming the field, exit code 2, no
traceback; --help lists the jobs, modes and every config's variants."""

from __future__ import annotations

import subprocess
import sys

from tests.test_cmu import ROOT, _env


def _main(*args, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmovseg_jax.main", *args], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_main_unknown_config_field(tmp_path):
    line = _one_error_line(_main("--config", "configs/def.py", f"--workdir={tmp_path}", "--config.model.depht=3"))
    assert line.startswith("error: --config.model.depht: config.model has no field 'depht'; valid fields: ")
    assert "checkpoint" in line and "variant" in line and "use_sar" in line
    line = _one_error_line(_main("--config", "configs/cmu.py", f"--workdir={tmp_path}", "--config.totl_steps=3"))
    assert "config has no field 'totl_steps'" in line and "total_steps" in line


def test_main_bad_variant_value_and_file(tmp_path):
    line = _one_error_line(_main("--config", "configs/def.py:pie_cluod", f"--workdir={tmp_path}"))
    assert "unknown variant 'pie_cluod' of configs/def.py" in line and "pie_cloud" in line
    line = _one_error_line(_main("--config", "configs/cmu.py", f"--workdir={tmp_path}", "--config.total_steps=ten"))
    assert "--config.total_steps=ten" in line
    line = _one_error_line(_main("--config", "configs/nothere.py", f"--workdir={tmp_path}"))
    assert "configs/nothere.py: no such file" in line and "configs/def.py" in line


def test_main_bad_speed_choice_names_the_field(tmp_path):
    line = _one_error_line(_main("--config", "configs/cmu.py", f"--workdir={tmp_path}", "--config.model.gelu=fast"))
    assert line == "error: config.model.gelu: 'fast' is not one of exact, tanh"
    line = _one_error_line(_main("--config", "configs/def.py", f"--workdir={tmp_path}",
                                 "--config.model.residual_dtype=float16"))
    assert line == "error: config.model.residual_dtype: 'float16' is not one of float32, bfloat16"
    line = _one_error_line(_main("--config", "configs/cmu.py", f"--workdir={tmp_path}",
                                 "--config.model.teacher_fp8=dynamic"))
    assert line == "error: config.model.teacher_fp8: 'dynamic' is not one of off, static"
    line = _one_error_line(_main("--config", "configs/cmu.py", f"--workdir={tmp_path}",
                                 "--config.model.teacher_fp8=static"))
    assert line == ("error: config.model.teacher_fp8 = 'static' needs config.model.dtype = 'bfloat16', got "
                    "'float32'")
    line = _one_error_line(_main("--config", "configs/def.py", f"--workdir={tmp_path}", "--config.eval.fp8=dynamic"))
    assert line == "error: config.eval.fp8: 'dynamic' is not one of model, off, on, static"
    line = _one_error_line(_main("--config", "configs/def.py", f"--workdir={tmp_path}", "--config.eval.fp8=static",
                                 "--config.eval.fp8_calibration_split=val"))
    assert line == "error: config.eval.fp8_calibration_split: 'val' is not one of train, test"
    assert not (tmp_path / "checkpoints").exists()


def test_main_batch_not_divisible(tmp_path):
    line = _one_error_line(_main("--config", "configs/cmu.py", f"--workdir={tmp_path}",
                                 "--config.global_batch_size=6", devices=4))
    assert line == "error: config.global_batch_size = 6 is not divisible by the 4 devices of the mesh"
    assert not (tmp_path / "checkpoints").exists()


def test_help_lists_modes_and_variants():
    result = subprocess.run([sys.executable, "-m", "mmovseg_jax.main", "--help"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    text = result.stdout  # (absl exits 1 after --help)
    for expected in ("--mode", "train|eval|robustness", "configs/cmu.py", "configs/def.py", "configs/encoders.py",
                     "pie_cloud", "ddhr_sk_to_ch", "large_batch", "SIGTERM"):
        assert expected in text, expected
