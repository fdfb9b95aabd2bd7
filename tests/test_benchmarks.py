"""Smoke tests of the benchmark scripts at toy sizes (each run as a subprocess, as a user
runs it), and checks of the shared FLOP and peak bookkeeping in benchmarks/common.py.

benchmarks/infonce_memory.py and encoder_forward.py have theirs in test_losses.py and
test_main_demo.py. Recorded tables go to temporary files, never to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import def_step  # noqa: E402
import hlo_traffic  # noqa: E402


def _run(args: list[str], timeout: float = 300, **extra_env: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_cmu_step_tiny(tmp_path):
    results, rows_json = tmp_path / "RESULTS.md", tmp_path / "cmu.json"
    out = _run(["benchmarks/cmu_step.py", "--variant", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1",
                "--dtype", "float32", "--cls-shortcut", "both", "--profile", "--results", str(results),
                "--json", str(rows_json)])
    assert ("| impl | attention | cls shortcut | fp8 | teacher fp8 | f8 GEMMs | fast numerics | size | batch | step ms | "
            "img/s | TFLOP/s | MFU |") in out
    assert "| jax | xla | off | off | off | - | off | 32 | 4 |" in out
    assert "| jax | xla | on | off | off | - | off | 32 | 4 |" in out
    assert "failed" not in out
    rows = json.loads(rows_json.read_text())["rows"]
    jax_rows = [r for r in rows if r["impl"] == "jax"]
    assert len(jax_rows) == 2 and all(r["img/s"] > 0 and r["compile s"] > 0 for r in jax_rows)
    # The analytic count the TFLOP/s column uses: teacher forward + 3 x student forward
    # (the anchor's work; the CLS shortcut does less, and is credited with the same count).
    tokens, d, depth = (32 // 16) ** 2 + 1, 32, 2
    fwd = depth * (24 * d * d * tokens + 4 * tokens * tokens * d) + 2 * tokens * 3 * 16 * 16 * d
    assert all(r["analytic GFLOP/step"] == pytest.approx(4 * 4 * fwd / 1e9) for r in jax_rows)
    # --profile: the step's device time split by XLA op (here the CPU's thunks).
    for r in jax_rows:
        assert r["profile"]["device_ms"] > 0 and r["profile"]["ops"] and "profile: cmu step 32 px" in out
    # On this machine PyTorch either is absent, has no CUDA, or ran the anchor beside us.
    torch_info = json.loads(rows_json.read_text())["torch"]
    if "skipped" in torch_info:
        assert "torch:" in out
    else:
        assert "ratio ours / torch eager at 32 px, batch 4" in out
    recorded = results.read_text()
    assert "## cmu_step (tiny)" in recorded and "| jax | xla | on | off | off | - | off | 32 | 4 |" in recorded


def test_cmu_step_tiny_fp8(tmp_path):
    """--fp8 on --fast-numerics on: the step with float8 block GEMMs, a bfloat16 residual
    stream and the tanh GELU runs; the f8 GEMMs column counts the float8 GEMMs XLA
    compiled, none on a CPU (the rounding is emulated there); --hlo-dir keeps the HLO."""
    out = _run(["benchmarks/cmu_step.py", "--variant", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1",
                "--fp8", "on", "--fast-numerics", "on", "--torch", "off", "--json", str(tmp_path / "cmu.json"),
                "--hlo-dir", str(tmp_path / "hlo")])
    (row,) = json.loads((tmp_path / "cmu.json").read_text())["rows"]
    assert row["fp8"] == "on" and row["fast numerics"] == "on" and row["img/s"] > 0 and "failed" not in out
    # --hlo-dir: the optimised HLO of the timed step, with the float8 rounding in it
    (hlo,) = (tmp_path / "hlo").iterdir()
    assert hlo.name == "cmu_32_b4_xla_shortcut-on_fp8-on_tfp8-off_fast-on_remat-none.hlo.txt"
    text = hlo.read_text()
    assert text.startswith("HloModule") and "f8e4m3fn" in text and "f8e5m2" in text
    assert isinstance(row["f8 GEMMs"], int)
    if "(cpu)" in out:  # the header names the platform
        assert row["f8 GEMMs"] == 0


def test_cmu_step_tiny_static_float8_teacher(tmp_path):
    """--teacher-fp8 static: the teacher is calibrated on random tiles and frozen in float8,
    the student trains in bf16, so the step holds e4m3 operands and no e5m2 gradients."""
    out = _run(["benchmarks/cmu_step.py", "--variant", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1",
                "--teacher-fp8", "static", "--torch", "off", "--json", str(tmp_path / "cmu.json"),
                "--hlo-dir", str(tmp_path / "hlo")])
    (row,) = json.loads((tmp_path / "cmu.json").read_text())["rows"]
    assert row["fp8"] == "off" and row["teacher fp8"] == "static" and row["img/s"] > 0 and "failed" not in out
    assert isinstance(row["f8 GEMMs"], int)
    (hlo,) = (tmp_path / "hlo").iterdir()
    text = hlo.read_text()
    assert "tfp8-static" in hlo.name and "f8e4m3fn" in text and "f8e5m2" not in text


def test_float8_gemm_count_reads_optimised_hlo():
    """hlo_traffic on HLO text laid out as XLA's GPU compiler prints it (operands by name,
    their types on their definitions): cuBLASLt float8 calls and Triton GEMM fusions with
    float8 operands count as float8 GEMMs, bf16 GEMMs and the elementwise fusion that
    makes a float8 array do not; each launch's operand and result bytes add up by kind."""
    hlo = "\n".join([
        "ENTRY %main.1 (x.1: bf16[4096,768], w.1: bf16[768,3072]) -> bf16[4096,3072] {",
        "  %x.1 = bf16[4096,768]{1,0} parameter(0)",
        "  %w.1 = bf16[768,3072]{1,0} parameter(1)",
        "  %loop_convert_fusion = f8e4m3fn[4096,768]{1,0} fusion(%x.1, %s.1), kind=kLoop, calls=%fused_convert",
        "  %bitcast.12.0 = f8e4m3fn[768,3072]{0,1} bitcast(%w8.1)",
        "  %cublas-gemm.3 = (bf16[4096,3072]{1,0}, s8[4194304]{0}) custom-call(%loop_convert_fusion, "
        '%bitcast.12.0, %s.2, %c.1), custom_call_target="__cublas$lt$matmul$f8"',
        "  %gemm_fusion_dot.7 = bf16[4096,768]{1,0} fusion(%loop_convert_fusion.2, %bitcast.12.0), kind=kCustom, "
        'calls=%gemm_fusion_dot.7_computation, backend_config={"fusion_backend_config":{"kind":'
        '"__triton_nested_gemm_fusion"}}',
        "  %loop_convert_fusion.2 = f8e5m2[4096,3072]{1,0} fusion(%g.1), kind=kLoop, calls=%fused_convert.2",
        "  %gemm_fusion_dot.8 = bf16[4096,3072]{1,0} fusion(%x.1, %w.1), kind=kCustom, "
        'calls=%gemm_fusion_dot.8_computation, backend_config={"fusion_backend_config":{"kind":'
        '"__triton_nested_gemm_fusion"}}',
        "  %cublas-gemm.4 = (bf16[4096,3072]{1,0}, s8[0]{0}) custom-call(%x.1, %w.1), "
        'custom_call_target="__cublas$lt$matmul"',
        "}",
    ])
    assert hlo_traffic.float8_gemms(hlo) == 2
    table = hlo_traffic.summary(hlo)
    assert {k: v["count"] for k, v in table.items()} == {"loop fusion": 2, "gemm f8": 1, "gemm (triton)": 2,
                                                         "gemm": 1}
    mb = 4096 * 768, 768 * 3072, 4096 * 3072  # x, w, y elements
    # the f8 call reads x and w as float8 (1 byte) and writes bf16 y; the workspace is not traffic
    assert table["gemm f8"]["gb"] * 1e9 == pytest.approx(mb[0] + mb[1] + 2 * mb[2])
    # the bf16 cuBLAS call reads bf16 x and w and writes bf16 y
    assert table["gemm"]["gb"] * 1e9 == pytest.approx(2 * (mb[0] + mb[1] + mb[2]))
    assert "| all | 6 |" in hlo_traffic.table_text(hlo)
    (family, launches, _), = hlo_traffic.families(hlo, 5)  # both float8 casts, one family
    assert (family, launches) == ("loop_convert_fusion", 2)


def test_def_step_toy_inference(tmp_path):
    out = _run(["benchmarks/def_step.py", "--variant", "toy", "--modes", "inference,encoders", "--steps", "2",
                "--warmup", "1", "--dtype", "float32", "--json", str(tmp_path / "def.json")])
    assert ("| mode | attention | fp8 | f8 GEMMs | fast numerics | remat | size | batch | classes | step ms | tiles/s | "
            "TFLOP/s | MFU |") in out
    assert "| inference | xla | off | - | off | - | 64 | 2 | 2 |" in out and "failed" not in out
    row, encoders = json.loads((tmp_path / "def.json").read_text())["rows"]
    assert row["tiles/s"] > 0 and row["GFLOP/tile"] > 0 and row["MFU"] == "n/a"
    # the encoders-only row is the same computation without the head: fewer FLOPs
    assert encoders["mode"] == "encoders" and 0 < encoders["GFLOP/tile"] < row["GFLOP/tile"]


def test_def_step_toy_static_fp8(tmp_path):
    """--fp8 all: inference rows off, on (current scaling) and static (calibrated and
    frozen); static scales refuse the train step."""
    out = _run(["benchmarks/def_step.py", "--variant", "toy", "--modes", "inference", "--fp8", "all",
                "--steps", "1", "--warmup", "1", "--json", str(tmp_path / "def.json")])
    rows = {r["fp8"]: r for r in json.loads((tmp_path / "def.json").read_text())["rows"]}
    assert rows["static"]["tiles/s"] > 0 and rows["on"]["tiles/s"] > 0 and rows["off"]["f8 GEMMs"] is None
    assert "| inference | xla | static |" in out and "failed" not in out
    with pytest.raises(ValueError, match="static float8 scales are for inference only"):
        def_step.bench("train", "toy", 2, 2, "xla", "bfloat16", 1, 1, None, fp8="static")


@pytest.mark.slow
def test_def_step_toy_train(tmp_path):
    """A train row per --remat value, each with its compiled scratch memory; the model
    FLOPs (hence MFU) are those without recomputation whatever the policy."""
    out = _run(["benchmarks/def_step.py", "--variant", "toy", "--modes", "train", "--steps", "2", "--warmup", "1",
                "--dtype", "float32", "--remat", "none,full", "--json", str(tmp_path / "def.json")])
    assert "| train | xla | off | - | off | none | 64 | 2 | 2 |" in out and "failed" not in out
    assert "| train | xla | off | - | off | full | 64 | 2 | 2 |" in out
    plain, full = json.loads((tmp_path / "def.json").read_text())["rows"]
    assert plain["GFLOP/tile"] == full["GFLOP/tile"] > 0 and plain["temp GiB"] > 0
    with pytest.raises(SystemExit):
        def_step.main(["--variant", "toy", "--remat", "some"])


def test_input_pipeline_toy(tmp_path):
    out = _run(["benchmarks/input_pipeline.py", "--records", "8", "--tile", "96", "--crop", "64", "--batch", "4",
                "--batches", "2", "--warmup", "1", "--workers", "0", "--dir", str(tmp_path),
                "--results", str(tmp_path / "R.md")])
    assert "| format | workers | tile | crop | batch |" in out
    assert "| arrayrecord | 0 | 96 | 64 | 4 |" in out and "| png | 0 | 96 | 64 | 4 |" in out
    assert "failed" not in out
    assert "## input_pipeline" in (tmp_path / "R.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # the data set was cleaned up


@pytest.mark.slow
def test_gpu_script_runs_every_stage_at_toy_size(tmp_path):
    """benchmarks/gpu_issue6.sh, the one script a lent GPU session runs (minutes of device
    time, hard to come by), with SMOKE=1: every stage of its case list but the GPU test
    run, at toy sizes with XLA attention. Each exits 0 and times its rows; the tables and
    the packed details arrive in $OUT as the device tool returns them."""
    script = (ROOT / "benchmarks" / "gpu_issue6.sh").read_text()
    stages = [s for s in re.findall(r"^ {4}(\w+)\) stage ", script, re.M) if s != "attention_tests"]
    assert len(stages) >= 15 and "cmu224" in stages and "def_infer" in stages
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "SMOKE": "1", "OUT": str(out_dir), "STAGES": " ".join(stages), "BUDGET_S": "1500",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_issue6.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    ended = re.findall(r"^== (.+): exit (\d+) after", log, re.M)
    assert len(ended) == len(stages) and all(code == "0" for _, code in ended), ended
    assert "SKIPPED" not in log and "failed:" not in log and "!! unknown stage" not in log, log[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["RESULTS_issue6.md", "details.tar.gz", "gpu_issue6.log"]
    with tarfile.open(out_dir / "details.tar.gz") as packed:
        names = packed.getnames()
    assert "details/cmu_224.json" in names and "details/def_inference.json" in names
    assert any(n.startswith("details/hlo/") and n.endswith(".hlo.txt") for n in names)
    assert "## cmu_step" in (out_dir / "RESULTS_issue6.md").read_text()


def test_vit_flops_is_the_anchor_formula():
    """ViT-B/16 at 224 and 384: the anchor's expression from shared/bench/torch_cmu_anchor.py."""
    for size in (224, 384):
        tokens, d = (size // 16) ** 2 + 1, 768
        anchor = 12 * (24 * d * d * tokens + 4 * tokens * tokens * d) + 2 * tokens * 768 * 768
        assert common.vit_forward_flops(tokens, d, 12, 3072, 16) == anchor
    # 224 px: about 35 GFLOP per image forward (REFERENCE.md section 6).
    assert 34e9 < common.vit_forward_flops(197, 768, 12, 3072, 16) < 36e9


def test_peaks_and_mfu():
    assert common.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert common.peak_tflops("NVIDIA H200") == 989.0
    assert common.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert common.peak_tflops("NVIDIA A100-SXM4-80GB") is None
    assert common.mfu_text(494.5, 989.0) == "50.0%"
    assert common.mfu_text(10.0, None) == "n/a"
    assert common.table(("a", "b"), [{"a": 1, "b": None}]) == "| a | b |\n|---|---|\n| 1 | - |"


def _cuda_plugin_present() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


@pytest.mark.skipif(not _cuda_plugin_present(), reason="needs jaxlib's CUDA plugin and NVIDIA wheels (about 5 GB; "
                    "see benchmarks/compile_for_gpu.py), not part of requirements.txt")
def test_compile_for_gpu_finds_the_float8_gemms(tmp_path):
    """Deviceless compile of the CMU step for an H200: cuDNN attention calls in it, no
    float8 GEMM in the bf16 step, float8 GEMMs for every block matmul with fp8 on; and no
    batch-minor residual stream (with a (B, 1, D) CLS shortcut slice XLA transposed the
    residual around every GEMM: 11 GB of transpose fusions per step; see
    dino.CLS_SHORTCUT_ROWS)."""
    out = _run(["benchmarks/compile_for_gpu.py", "--steps", "cmu224,cmu224_fp8", "--out", str(tmp_path)],
               timeout=900)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| cmu224")}
    columns = ["compile s", "GEMM calls", "float8 GEMMs", "Triton GEMM fusions", "attention calls"]
    bf16, fp8 = (dict(zip(columns, rows[name])) for name in ("cmu224", "cmu224_fp8"))
    assert bf16["float8 GEMMs"] == "0" and int(fp8["float8 GEMMs"]) >= 190
    assert int(bf16["attention calls"]) > 0
    assert (tmp_path / "cmu224_fp8.hlo.txt").read_text().count("f8e4m3fn") > 0
    transposes = sum(gb for family, _, gb in hlo_traffic.families((tmp_path / "cmu224.hlo.txt").read_text(), 100)
                     if "transpose" in family)
    assert transposes < 1.0, f"{transposes:.1f} GB of transpose fusions in the CMU step"


@pytest.mark.skipif(not _cuda_plugin_present(), reason="needs jaxlib's CUDA plugin and NVIDIA wheels (about 5 GB; "
                    "see benchmarks/compile_for_gpu.py), not part of requirements.txt")
def test_compile_for_gpu_activation_remat_moves_fewer_bytes(tmp_path):
    """Deviceless compile of the CMU step with fast numerics for an H200 in the cuBLAS form,
    with config.remat none and "activation": recomputing the student's tanh GELU from its
    input lets cuBLASLt apply it in each full-width fc1 GEMM's epilogue, writing the
    pre-activation beside it (BIAS_GELU_AUX), and the step moves fewer bytes outside GEMMs
    and attention (measured with jax 0.10.2: 43.97 -> 37.15 GB)."""
    out = _run(["benchmarks/compile_for_gpu.py", "--steps", "cmu224_fast,cmu224_fast_actremat", "--out",
                str(tmp_path)], timeout=900, XLA_FLAGS="--xla_gpu_enable_triton_gemm=false")
    hlo = {name: (tmp_path / f"{name}.hlo.txt").read_text() for name in ("cmu224_fast", "cmu224_fast_actremat")}
    assert hlo["cmu224_fast"].count('"epilogue":"BIAS_GELU_AUX"') == 0
    assert hlo["cmu224_fast_actremat"].count('"epilogue":"BIAS_GELU_AUX"') >= 11, out[-2000:]
    memory_bound = {line.split("|")[1].strip(): float(line.split("|")[9]) for line in out.splitlines()
                    if line.startswith("| cmu224_fast")}
    assert memory_bound["cmu224_fast_actremat"] < memory_bound["cmu224_fast"] - 4, memory_bound


@pytest.mark.skipif(not _cuda_plugin_present(), reason="needs jaxlib's CUDA plugin and NVIDIA wheels (about 5 GB; "
                    "see benchmarks/compile_for_gpu.py), not part of requirements.txt")
def test_compile_for_gpu_float8_inference_forms(tmp_path):
    """Deviceless compile of DEF inference (B, 384 px, batch 8) for an H200 in the cuBLAS
    form, float8 with current and with static scales. Both compile: with fc1's output as
    rows, current scaling made XLA fold an amax into a GEMM that also read the scale made
    from it ("A cycle is detected"). With static scales, the rows padded once in the MLP
    and kept as rows, fc1's float8 GEMM applies bias and GELU and writes fc2's float8
    operand itself (one cuBLASLt call per MLP input, no separate quantising pass)."""
    _run(["benchmarks/compile_for_gpu.py", "--steps", "def_infer_fast_fp8,def_infer_fast_fp8static", "--out",
          str(tmp_path)], timeout=1500, XLA_FLAGS="--xla_gpu_enable_triton_gemm=false")
    static = (tmp_path / "def_infer_fast_fp8static.hlo.txt").read_text()
    assert hlo_traffic.float8_gemms(static) == 144
    fc1 = re.findall(r"= \(f8e4m3fn\[[0-9,]+\][^)]*\) custom-call\([^\n]*__cublas\$lt\$matmul\$f8[^\n]*BIAS_GELU", static)
    assert len(fc1) >= 24, f"{len(fc1)} float8 fc1 GEMMs with a GELU epilogue and float8 output"


@pytest.mark.skipif(not _cuda_plugin_present(), reason="needs jaxlib's CUDA plugin and NVIDIA wheels (about 5 GB; "
                    "see benchmarks/compile_for_gpu.py), not part of requirements.txt")
def test_compile_for_gpu_def_train_remat_halves_scratch_memory():
    """Deviceless compile of the DEF train step (B, 384 px, batch 8) for an H200 with
    config.remat none and full: with CLIP's towers and the head's blocks rematerialised the
    step's temporary buffers shrink by more than 40% (measured with jax 0.10.2: 7.35 ->
    3.60 GiB), and it recomputes (more GEMM calls)."""
    out = _run(["benchmarks/compile_for_gpu.py", "--steps", "def_train,def_train_fullremat"], timeout=900,
               XLA_FLAGS="--xla_gpu_enable_triton_gemm=false")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| def_train")}
    temp = {name: float(r[-1]) for name, r in rows.items()}
    gemms = {name: int(r[1]) for name, r in rows.items()}
    assert temp["def_train_fullremat"] < 0.6 * temp["def_train"], temp
    assert gemms["def_train_fullremat"] > gemms["def_train"], gemms
