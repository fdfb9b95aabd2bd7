"""Compiles the CMU step and DEF inference for an H200 (or H100) on a machine without a
GPU, with XLA's deviceless ahead-of-time compilation, and says what XLA made of them.

    PYTHONPATH=/opt/jax-cuda python benchmarks/compile_for_gpu.py --out /tmp/hlo
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false PYTHONPATH=/opt/jax-cuda \
        python benchmarks/compile_for_gpu.py --steps cmu224,cmu224_fp8

Nothing runs and nothing is timed: the table counts the GEMM calls (cuBLAS, float8),
Triton GEMM fusions, cuDNN attention calls and other kernels, and the bytes they move
(`hlo_traffic.py`); `--out` keeps each optimised HLO. It answers questions a GPU session
is too short for, such as whether the float8 products of `--config.model.fp8` compile to
float8 GEMMs (they do: 192 in the CMU step) or where the memory traffic goes. Without a
device XLA cannot autotune: its GEMMs default to Triton fusions with untuned tiles,
where on the card autotuning picks cuBLAS or tuned Triton; fusion and layout decisions
are the card's. `--xla_gpu_enable_triton_gemm=false` shows the cuBLAS form.

Needs the CUDA plugin of the installed jaxlib and NVIDIA's wheels (about 5 GB; not in
requirements.txt), e.g. into a side folder, V being `python -c "import jaxlib; print(jaxlib.__version__)"`:

    pip install --target /opt/jax-cuda --no-deps jax-cuda12-plugin==$V jax-cuda12-pjrt==$V \
        nvidia-cublas-cu12 nvidia-cuda-cupti-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12 \
        "nvidia-cudnn-cu12>=9.8,<10" nvidia-cufft-cu12 nvidia-cusolver-cu12 nvidia-cusparse-cu12 \
        nvidia-nccl-cu12 nvidia-nvjitlink-cu12 nvidia-cuda-nvrtc-cu12 nvidia-nvshmem-cu12
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

import cmu_step  # noqa: E402
import common  # noqa: E402
import def_step  # noqa: E402
import hlo_traffic  # noqa: E402
from mmovseg_jax.models import dino, layers  # noqa: E402
from mmovseg_jax.train import cmu, loop, optim, sharding  # noqa: E402

# Per card: (SMs, HBM bytes/s, memory bytes, description); the rest is Hopper's (sm_90).
CARDS = {"h200": (132, 4.8e12, 141 * 2 ** 30, "NVIDIA H200"), "h100": (132, 3.35e12, 80 * 2 ** 30,
                                                                      "NVIDIA H100 80GB HBM3")}
# NAME[_fast][_fp8|_fp8static|_tfp8static][_actremat]: _fast with common.FAST_NUMERICS (bf16 residual
# stream, tanh GELU), _fp8 with float8 block GEMMs (current scaling), _fp8static with float8
# layers calibrated and frozen (inference only; def_step.freeze_fp8 runs the model once
# on the CPU first, so these take a minute longer), _tfp8static the CMU step with only its
# frozen teacher so (config.model.teacher_fp8 = "static"; calibrated on the CPU first too);
# _actremat the CMU step with config.remat = "activation" (not with _fast_fp8: cmu.student_remat
# refuses that, XLA fails to compile it); def_train the DEF train step (def_step.py's, batch
# --def-train-batch), _actremat / _fullremat / _dotsremat with config.remat = activation / full / dots.
STEPS = ("cmu224", "cmu224_fp8", "cmu224_fast", "cmu224_fast_fp8", "cmu224_tfp8static", "cmu224_fast_tfp8static",
         "cmu224_actremat", "cmu224_fast_actremat", "cmu224_fp8_actremat",
         "def_infer", "def_infer_fp8", "def_infer_fast", "def_infer_fast_fp8", "def_infer_fp8static",
         "def_infer_fast_fp8static",
         "def_train", "def_train_actremat", "def_train_fullremat", "def_train_dotsremat", "def_train_fp8_actremat")
REMAT_TOKENS = {"actremat": "activation", "fullremat": "full", "dotsremat": "dots"}
COLUMNS = ("step", "compile s", "GEMM calls", "float8 GEMMs", "Triton GEMM fusions", "attention calls",
           "other kernels", "GB moved", "memory-bound GB", "memory-bound ms at bandwidth", "temp GiB")


def _version(package: str, default: tuple[int, int]) -> tuple[int, int]:
    try:
        major, minor = importlib.metadata.version(package).split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return default


def target_config(card: str) -> str:
    """XLA's GpuTargetConfigProto (text) of a Hopper card, with the cuDNN and CUDA runtime
    versions of the installed NVIDIA wheels."""
    sms, bandwidth, memory, description = CARDS[card]
    dnn, runtime = _version("nvidia-cudnn-cu12", (9, 8)), _version("nvidia-cuda-runtime-cu12", (12, 9))
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} }}
runtime_version {{ major: {runtime[0]} minor: {runtime[1]} }}
device_description_str: "{description}"
"""


def _on(mesh, tree, spec_of=None):
    """Abstract arrays (shape, dtype) placed on the compile-only mesh."""
    replicated = sharding.replicated(mesh)
    return jax.tree.map(lambda x, s=None: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s or replicated),
                        tree, *([spec_of] if spec_of is not None else []))


def lower_cmu(mesh, fp8: bool, fast_numerics: bool = False, size: int = 224, batch: int = 128,
              teacher_fp8: str = "off", remat: str = "none"):
    """The CMU step of `cmu_step.py` (B/16 teacher and student, cuDNN attention, CLS
    shortcut), lowered on abstract inputs (a teacher in static float8 is built, calibrated
    on the CPU and frozen first). remat: config.remat (layers.REMAT_POLICIES)."""
    config = cmu_step.make_config("B16", size, batch, "bfloat16", True, remat, fp8, fast_numerics, teacher_fp8)
    tcfg = cmu_step.teacher_config(config, "cudnn")
    if teacher_fp8 == "static":
        teacher = cmu_step.build_teacher(config, tcfg)
    else:
        teacher = nnx.eval_shape(lambda: dino.Model(tcfg, rngs=nnx.Rngs(0)))
    aligner = nnx.eval_shape(lambda: cmu.Aligner(tcfg, len(config.blocks), config.loss.projection_dim,
                                                 config.loss.temperature, config.loss.learn_temperature,
                                                 rngs=nnx.Rngs(1)))
    aligner_def, aligner_params = nnx.split(aligner)
    teacher_def, teacher_params = nnx.split(teacher)
    tx, lr = optim.make(config.optimizer, config.total_steps)
    state = jax.eval_shape(lambda p: loop.initial_state(p, tx.init(p)), aligner_params)
    shardings = sharding.state_shardings(state, mesh, config.mesh.rules)
    batch_sharding = sharding.batch_sharding(mesh)
    images = {"rgb": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=batch_sharding),
              "sar": jax.ShapeDtypeStruct((batch, size, size), jnp.uint8, sharding=batch_sharding)}
    step = cmu.make_train_step(aligner_def, teacher_def, tx, lr, config, mesh, shardings)
    return step.lower(_on(mesh, state, shardings), _on(mesh, teacher_params), images)


def lower_def(mesh, fp8: str, fast_numerics: bool = False, batch: int = 8, classes: int = 8):
    """DEF inference of `def_step.py` (variant B, 384 px, cuDNN attention), lowered on
    abstract inputs. fp8: "off" | "on" | "static" (def_step.FP8_MODES)."""
    cfg = def_step.model_config("B", "bfloat16", "cudnn", fp8 != "off", fast_numerics)
    fn, state, text = def_step.make_infer(cfg, True, classes, fp8_static=fp8 == "static")
    s = cfg.image_size
    image = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
    return fn.lower(_on(mesh, state), *_on(mesh, [image, image, text]))


def lower_def_train(mesh, fp8: bool, fast_numerics: bool = False, batch: int = 8, classes: int = 8,
                    remat: str = "none"):
    """The DEF train step of `def_step.py` (variant B, 384 px, cuDNN attention, CLIP q/v
    trainable, DINOs frozen, AdamW), lowered on abstract inputs. remat: config.remat."""
    cfg = def_step.model_config("B", "bfloat16", "cudnn", fp8, fast_numerics)
    config = def_step.train_config("B", batch, "bfloat16", remat)
    step, state, frozen, _ = def_step.build_train(cfg, config, True, mesh)
    s = cfg.image_size
    batch_sharding = sharding.batch_sharding(mesh)
    u8 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=batch_sharding)  # noqa: E731
    batch_in = {"rgb": u8((batch, s, s, 3)), "sar": u8((batch, s, s)), "label": u8((batch, s, s))}
    tokens = jax.ShapeDtypeStruct((classes, len(cfg.templates), cfg.clip.text.context_length), jnp.int32)
    state_shardings = sharding.state_shardings(state, mesh, config.mesh.rules)
    return step.lower(_on(mesh, state, state_shardings), _on(mesh, frozen), batch_in, _on(mesh, tokens))


def compile_row(name: str, lower, out: Path | None, bandwidth: float) -> dict:
    start = time.perf_counter()
    compiled = lower().compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    common.write_hlo(out, name, text)
    table = hlo_traffic.summary(text)
    count = lambda *kinds: int(sum(table.get(k, {}).get("count", 0) for k in kinds))  # noqa: E731
    memory = sum(r["gb"] for k, r in table.items() if not k.startswith("gemm") and k != "attention")
    return {"step": name, "compile s": seconds, "GEMM calls": count("gemm", "gemm f8"),
            "float8 GEMMs": hlo_traffic.float8_gemms(text), "Triton GEMM fusions": count("gemm (triton)"),
            "attention calls": count("attention"),
            "other kernels": int(sum(r["count"] for k, r in table.items()
                                     if not k.startswith("gemm") and k != "attention")),
            "GB moved": sum(r["gb"] for r in table.values()), "memory-bound GB": memory,
            "memory-bound ms at bandwidth": 1e3 * memory * 1e9 / bandwidth, "temp GiB": common.temp_gib(compiled)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    p.add_argument("--card", default="h200", choices=sorted(CARDS))
    p.add_argument("--out", type=Path, default=None, help="write each optimised HLO here (NAME.hlo.txt)")
    p.add_argument("--def-train-batch", type=int, default=8, help="tiles per def_train step (default 8)")
    common.add_cudnn_pad_arg(p)
    args = p.parse_args(argv)
    common.apply_cudnn_pad(args.cudnn_pad_multiple)
    steps = [s.strip() for s in args.steps.split(",")]
    for s in steps:
        if s not in STEPS:
            p.error(f"unknown step {s!r}; choose from {', '.join(STEPS)}")
    jax.config.update("jax_platforms", "cpu")  # no GPU backend: the topology brings a compile-only one
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(args.card),
                                                topology="1x1x1")
    except Exception as e:  # no CUDA plugin, or one that cannot compile without a device
        sys.exit(f"compile_for_gpu: no compile-only CUDA backend ({type(e).__name__}: {str(e)[:200]}); install "
                 "the CUDA plugin and NVIDIA wheels as this script's docstring says and put them on PYTHONPATH")
    mesh = topologies.make_mesh(topology, (1, 1), sharding.BATCH_AXES)
    bandwidth = CARDS[args.card][1]
    rows = []
    for name in steps:
        parts = name.split("_")[1:]
        fp8 = "static" if "fp8static" in parts else "on" if "fp8" in parts else "off"
        fast, teacher_fp8 = "fast" in parts, "static" if "tfp8static" in parts else "off"
        remat = next((REMAT_TOKENS[t] for t in parts if t in REMAT_TOKENS), "none")
        if name.startswith("cmu224"):
            lower = lambda: lower_cmu(mesh, fp8 == "on", fast, teacher_fp8=teacher_fp8, remat=remat)  # noqa: E731
        elif name.startswith("def_train"):
            lower = lambda: lower_def_train(mesh, fp8 == "on", fast, args.def_train_batch, remat=remat)  # noqa: E731
        else:
            lower = lambda: lower_def(mesh, fp8, fast)  # noqa: E731
        try:
            rows.append(compile_row(name, lower, args.out, bandwidth))
            print(f"  done: {name} in {rows[-1]['compile s']:.0f} s", flush=True)
        except Exception as e:  # XLA refusing one step (e.g. a RET_CHECK) must not lose the others' rows
            rows.append({"step": name, "compile s": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            print(f"  FAILED: {name}: {rows[-1]['compile s']}", flush=True)
    print(f"deviceless compile for {CARDS[args.card][3]}: jax {jax.__version__}, cuDNN wheel "
          f"{'.'.join(map(str, _version('nvidia-cudnn-cu12', (0, 0))))}, cuDNN attention tokens padded to a "
          f"multiple of {layers.CUDNN_PAD_MULTIPLE}, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '') or '(none)'}")
    print(common.table(COLUMNS, rows))
    return rows


if __name__ == "__main__":
    main()
