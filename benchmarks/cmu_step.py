"""Throughput of the CMU train step (frozen ViT teacher + ViT student + InfoNCE + AdamW),
beside the PyTorch eager anchor of shared/bench/torch_cmu_anchor.py at the same shapes.

    python benchmarks/cmu_step.py                                   # B/16 at 224 (batch 128) and 384 (batch 48)
    python benchmarks/cmu_step.py --attention xla,cudnn --record    # both attention kernels, appended to RESULTS.md
    python benchmarks/cmu_step.py --variant tiny --batch 4 --steps 2 --warmup 1   # seconds on a CPU

The step is the project's own (`mmovseg_jax.train.cmu.make_train_step`, one jitted call,
state donated) built as `cmu.run` builds it, on configs/cmu.py's "paper" setting changed to
the anchor's loss: DINO ViT-B/16 teacher and student (random weights, the student a copy
of the teacher), bf16 compute, InfoNCE on the CLS tokens of blocks 4/8/12 (0-based 3/7/11),
one way (SAR -> RGB), temperature 0.07, AdamW lr 3e-4, wd 1e-4, no clipping. Inputs are
random uint8 RGB and SAR tiles already on the device; the timed loop re-feeds them.

Columns: img/s (pairs per second), TFLOP/s and MFU from the analytic matmul FLOPs of
`common.vit_forward_flops` (the anchor's count: teacher forward + 3x student forward),
so the TFLOP/s of both sides are comparable; "XLA GFLOP/step" is XLA's cost analysis of
the step's HLO for reference (all ops; cuDNN attention custom calls count nothing). MFU
uses the card's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s; unknown card: n/a).
When PyTorch with CUDA is importable (--torch auto), the anchor runs first, in a
subprocess (before JAX takes the GPU's memory), and the ratio ours / torch eager is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
import hlo_traffic  # noqa: E402
from configs import cmu as cmu_configs  # noqa: E402
from mmovseg_jax.models import dino, layers, storage  # noqa: E402
from mmovseg_jax.train import cmu, sharding  # noqa: E402

# Per variant: the teacher/student architecture and the default image sizes.
VARIANTS = {
    "B16": dict(model=dict(variant="B/16"), sizes=(224, 384)),
    "tiny": dict(model=dict(variant="", patch_size=16, width=32, depth=2, num_heads=2), sizes=(32,)),
}
ANCHOR_BATCH = {224: 128, 384: 48}  # shared/bench/torch_cmu_anchor.py
ANCHOR_PATHS = (HERE.parent.parent / "shared" / "bench" / "torch_cmu_anchor.py",
                HERE.parent / ".shared_copy" / "bench" / "torch_cmu_anchor.py")
COLUMNS = ("impl", "attention", "cls shortcut", "fp8", "teacher fp8", "f8 GEMMs", "fast numerics", "size", "batch",
           "step ms", "img/s", "TFLOP/s", "MFU", "MFU vs measured", "remat", "temp GiB", "XLA GFLOP/step", "compile s",
           "ratio vs torch eager")


def make_config(variant: str, size: int, batch: int, dtype: str, cls_shortcut: bool = True,
                remat: str = "none", fp8: bool = False, fast_numerics: bool = False, teacher_fp8: str = "off"):
    """configs/cmu.py "paper" with the anchor's model size, batch and loss (`fp8`: the
    teacher's and student's block GEMMs in float8, config.model.fp8; `fast_numerics`:
    common.FAST_NUMERICS in config.model; `teacher_fp8`: config.model.teacher_fp8)."""
    c = cmu_configs.get_config("paper")
    c.model.fp8 = fp8
    c.model.teacher_fp8 = teacher_fp8
    if fast_numerics:
        c.model.update(common.FAST_NUMERICS)
    c.cls_shortcut = cls_shortcut
    c.remat = remat
    c.teacher_required = False
    c.global_batch_size = batch
    c.total_steps = 1000
    for k, v in VARIANTS[variant]["model"].items():
        c.model[k] = v
    c.model.image_size = size
    c.model.dtype = dtype
    c.blocks = (3, 7, 11) if variant == "B16" else (0, 1)
    c.loss.kind, c.loss.embedding = "infonce", "cls"
    c.loss.temperature, c.loss.symmetric = 0.07, False
    c.loss.chunk_size, c.loss.projection_dim, c.loss.learn_temperature = 0, 0, False
    c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.grad_clip = 3e-4, 1e-4, 0.0
    c.optimizer.warmup_steps = 10
    return c


def teacher_config(config, attention: str) -> dino.Config:
    """The teacher's architecture as `cmu.build_teacher` makes it, with the attention kernel."""
    m = config.model
    base = dino.VARIANTS[m.variant] if m.variant else dino.Config(
        patch_size=m.patch_size, width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=4 * m.width)
    return storage.with_kernels(dataclasses.replace(base, image_size=m.image_size, dtype=m.dtype),
                                **{**storage.kernel_choices(m), "attention": attention})


def analytic_flops(cfg: dino.Config, size: int, batch: int) -> float:
    """Teacher forward + student forward and backward (3x forward) matmul FLOPs per step."""
    tokens = (size // cfg.patch_size) ** 2 + 1
    fwd = common.vit_forward_flops(tokens, cfg.width, cfg.depth, cfg.mlp_dim, cfg.patch_size)
    return batch * 4 * fwd


def bench_one(variant: str, size: int, batch: int, attention: str, dtype: str, steps: int, warmup: int,
              peak: float | None, cls_shortcut: bool = True, measured_peak: float | None = None,
              profile: bool = False, remat: str = "none", fp8: bool = False, hlo_dir=None,
              fast_numerics: bool = False, teacher_fp8: str = "off") -> dict:
    """Builds the step as cmu.run does, compiles it, times it (and with `profile`, splits
    its device time by XLA op); one result row."""
    config = make_config(variant, size, batch, dtype, cls_shortcut, remat, fp8, fast_numerics, teacher_fp8)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    sharding.check_batch_size(batch, mesh)
    tcfg = teacher_config(config, attention)
    teacher = build_teacher(config, tcfg)
    aligner = common.random_init(lambda: cmu.Aligner(
        tcfg, len(config.blocks), config.loss.projection_dim, config.loss.temperature,
        config.loss.learn_temperature, rngs=nnx.Rngs(config.seed + 1)), config.seed + 1)
    setup = cmu.place(aligner, teacher, config, mesh)  # as cmu.run places them
    state, teacher_params = setup.state, setup.teacher_params
    rng = np.random.default_rng(0)
    batch_arrays = sharding.to_global({"rgb": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                                       "sar": rng.integers(0, 256, (batch, size, size), dtype=np.uint8)}, mesh)
    train_step = cmu.make_train_step(setup.aligner_def, setup.teacher_def, setup.tx, setup.lr, config, mesh,
                                     setup.state_shardings)

    start = time.perf_counter()
    lowered = train_step.lower(state, teacher_params, batch_arrays)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    float8 = fp8 or teacher_fp8 != "off"
    hlo = compiled.as_text() if float8 or hlo_dir is not None else ""  # rendered once, read twice
    common.write_hlo(hlo_dir, f"cmu_{size}_b{batch}_{attention}_shortcut-{'on' if cls_shortcut else 'off'}"
                              f"_fp8-{'on' if fp8 else 'off'}_tfp8-{teacher_fp8}"
                              f"_fast-{'on' if fast_numerics else 'off'}"
                              f"_remat-{remat}", hlo)

    def step(s):
        return compiled(s, teacher_params, batch_arrays)[0]

    seconds, state = common.time_loop(step, state, steps, warmup)
    flops = analytic_flops(tcfg, size, batch)
    hlo_flops = common.xla_flops(lowered)
    tflops = flops / seconds / 1e12
    row = {"impl": "jax", "attention": attention, "cls shortcut": "on" if cls_shortcut else "off",
           "fp8": "on" if fp8 else "off", "teacher fp8": teacher_fp8,
           "f8 GEMMs": hlo_traffic.float8_gemms(hlo) if float8 else None,
           "fast numerics": "on" if fast_numerics else "off", "size": size,
           "batch": batch, "step ms": 1e3 * seconds, "img/s": batch / seconds, "TFLOP/s": tflops,
           "MFU": common.mfu_text(tflops, peak), "MFU vs measured": common.mfu_text(tflops, measured_peak),
           "remat": remat, "temp GiB": common.temp_gib(compiled),
           "XLA GFLOP/step": hlo_flops / 1e9 if hlo_flops else None, "compile s": compile_s,
           "analytic GFLOP/step": flops / 1e9}
    if profile:
        row["profile"] = common.kernel_profile(step, state)
        print(common.profile_text(row["profile"], f"profile: cmu step {size} px, {attention}, cls shortcut "
                                                  f"{row['cls shortcut']}, fp8 {row['fp8']}, fast numerics "
                                                  f"{row['fast numerics']}"), flush=True)
    return row


def build_teacher(config, student_config: dino.Config) -> dino.Model:
    """The teacher with random weights drawn on the host (common.random_init: the values do
    not change the speed); with config.model.teacher_fp8 = "static", float8 and frozen
    after a calibration on random tiles (with XLA attention, which runs anywhere), as
    cmu.run does on the held-out ones."""
    static = cmu.teacher_fp8(config) == "static"
    cfg = dataclasses.replace(student_config, fp8=True) if static else student_config
    teacher = common.random_init(lambda: dino.Model(cfg, rngs=nnx.Rngs(config.seed)), config.seed)
    if static:
        size, n = config.model.image_size, min(config.global_batch_size, 16)
        tiles = np.random.default_rng(1).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        with common.xla_attention(teacher):
            cmu.freeze_teacher(teacher, config, [tiles])
    return teacher


def find_anchor(path: str | None) -> Path | None:
    if path:
        return Path(path)
    return next((p for p in ANCHOR_PATHS if p.is_file()), None)


ANCHOR_RUNNER = r"""
import importlib.util, json, sys
import torch
if not torch.cuda.is_available():
    print(json.dumps({"skipped": "torch " + torch.__version__ + " sees no CUDA device"}), flush=True)
    sys.exit(0)
spec = importlib.util.spec_from_file_location("torch_cmu_anchor", sys.argv[1])
anchor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(anchor)
import transformers
torch.backends.cuda.matmul.allow_tf32 = True
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                  "card": torch.cuda.get_device_name()}), flush=True)
for shape in json.loads(sys.argv[2]):
    try:
        r = anchor.run(shape["batch"], shape["size"], shape["compiled"], steps=shape["steps"])
    except Exception as e:
        r = {"img": shape["size"], "batch": shape["batch"], "compiled": shape["compiled"], "error": repr(e)[:300]}
    print(json.dumps(r), flush=True)
    torch.cuda.empty_cache()
"""


def run_anchor(anchor: Path, shapes: list[dict], timeout: float) -> tuple[dict, list[dict]]:
    """Runs the PyTorch anchor in a subprocess; (versions/skip info, result rows)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", ANCHOR_RUNNER, str(anchor), json.dumps(shapes)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"torch anchor ran past {timeout:.0f} s"}, []
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        return {"skipped": f"torch anchor failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}, []
    return lines[0], lines[1:]


def torch_rows(results: list[dict], peak: float | None, measured: float | None = None) -> list[dict]:
    rows = []
    for r in results:
        row = {"impl": "torch compile" if r.get("compiled") else "torch eager", "attention": "sdpa",
               "size": r.get("img"), "batch": r.get("batch")}
        if "error" in r:
            row["step ms"] = r["error"][:60]
        else:
            row.update({"step ms": r["step_ms"], "img/s": r["img_per_s"], "TFLOP/s": r["tflops"],
                        "MFU": common.mfu_text(r["tflops"], peak),
                        "MFU vs measured": common.mfu_text(r["tflops"], measured)})
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="B16", choices=sorted(VARIANTS), help="B16 (the anchor's) or tiny (CPU smoke)")
    p.add_argument("--sizes", default=None, help="comma list of image sizes (default: the variant's)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch for every size (default: the anchor's, 128 at 224 and 48 at 384; else 128)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--attention", default="xla", help="comma list of xla, cudnn, auto")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    p.add_argument("--cls-shortcut", default="on", choices=("on", "off", "both"),
                   help="config.cls_shortcut: the deepest block for the leading token rows only (on, the default), "
                        "every token (off, as the anchor), or a row of each")
    p.add_argument("--fp8", default="off", choices=("on", "off", "both"),
                   help="config.model.fp8: float8 block GEMMs in teacher and student (changes results; off, the "
                        "default), or a row of each; the f8 GEMMs column counts those XLA compiled")
    p.add_argument("--teacher-fp8", default="off", choices=("off", "static", "both"),
                   help="config.model.teacher_fp8: the frozen teacher's GEMMs in float8 with static scales, "
                        "calibrated on random tiles (changes results; off, the default), or a row of each")
    common.add_fast_numerics_arg(p)
    p.add_argument("--remat", default="none",
                   help=f"config.remat, comma list of {', '.join(layers.REMAT_POLICIES)} (a row each): recompute "
                        "some of the student's block activations in the backward pass")
    p.add_argument("--profile", action="store_true", help="also split each row's device time by XLA op "
                                                          "(jax.profiler) and print the top ops")
    p.add_argument("--measure-peak", action="store_true",
                   help="time a bf16 8192^3 matmul first and add MFU against that measured ceiling")
    p.add_argument("--torch", default="auto", choices=("auto", "off"),
                   help="auto: run the PyTorch anchor first when torch with CUDA is importable")
    p.add_argument("--torch-compiled", action="store_true", help="also time the anchor under torch.compile")
    p.add_argument("--torch-anchor", default=None, help="path of torch_cmu_anchor.py (default: ../shared/bench/ "
                                                        "or .shared_copy/bench/)")
    p.add_argument("--torch-timeout", type=float, default=300.0, help="seconds allowed for the anchor")
    common.add_output_args(p)
    common.add_hlo_arg(p)
    common.add_cudnn_pad_arg(p)
    args = p.parse_args(argv)
    pad_label = common.apply_cudnn_pad(args.cudnn_pad_multiple)
    sizes = [int(s) for s in (args.sizes.split(",") if args.sizes else VARIANTS[args.variant]["sizes"])]
    attentions = [a.strip() for a in args.attention.split(",")]
    remats = [r.strip() for r in args.remat.split(",")]
    for r in remats:
        if r not in layers.REMAT_POLICIES:
            p.error(f"--remat: {r!r} is not one of {', '.join(layers.REMAT_POLICIES)}")
    batches = {s: args.batch or ANCHOR_BATCH.get(s, 128) for s in sizes}

    torch_info, anchor_results = {"skipped": "--torch off"}, []
    if args.torch == "auto":
        anchor = find_anchor(args.torch_anchor)
        if importlib.util.find_spec("torch") is None:
            torch_info = {"skipped": "torch is not installed"}
        elif anchor is None or not anchor.is_file():
            torch_info = {"skipped": f"torch_cmu_anchor.py not found (looked in {', '.join(map(str, ANCHOR_PATHS))})"}
        else:
            shapes = [{"size": s, "batch": batches[s], "compiled": c, "steps": args.steps}
                      for s in sizes for c in ((False, True) if args.torch_compiled else (False,))]
            torch_info, anchor_results = run_anchor(anchor, shapes, args.torch_timeout)

    info = common.device_info()
    peak = info["peak_tflops"]
    measured = common.measured_matmul_tflops() if args.measure_peak else None
    if measured:
        print(f"measured bf16 matmul: {measured:.1f} TFLOP/s", flush=True)
    choices = common.ON_OFF
    rows = []
    teacher_choices = ("off", "static") if args.teacher_fp8 == "both" else (args.teacher_fp8,)
    for size, attention, shortcut, fp8, fast, teacher_fp8, remat in itertools.product(
            sizes, attentions, choices[args.cls_shortcut], choices[args.fp8], choices[args.fast_numerics],
            teacher_choices, remats):
        try:
            rows.append(bench_one(args.variant, size, batches[size], attention, args.dtype, args.steps,
                                  args.warmup, peak, shortcut, measured, args.profile, remat, fp8, args.hlo_dir,
                                  fast, teacher_fp8))
        except Exception as e:  # e.g. cuDNN refusing a shape: say so and go on
            rows.append({"impl": "jax", "attention": attention, "size": size, "batch": batches[size],
                         "cls shortcut": "on" if shortcut else "off", "fp8": "on" if fp8 else "off",
                         "teacher fp8": teacher_fp8, "fast numerics": "on" if fast else "off", "remat": remat,
                         "step ms": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"})
        print(f"  done: {json.dumps({k: v for k, v in rows[-1].items() if k != 'profile'}, default=str)}",
              flush=True)
    for r in rows:  # a padding other than the default is named in the attention column
        if r["attention"] in ("cudnn", "auto"):
            r["attention"] += pad_label
    rows += torch_rows(anchor_results, peak, measured)
    eager = {(r["size"], r["batch"]): r["img/s"] for r in rows if r["impl"] == "torch eager" and r.get("img/s")}
    for r in rows:
        if r["impl"] == "jax" and r.get("img/s") and (r["size"], r["batch"]) in eager:
            r["ratio vs torch eager"] = f"{r['img/s'] / eager[(r['size'], r['batch'])]:.2f}x"

    header = (f"CMU step ({args.variant}, {args.dtype}); device {info['count']} x {info['kind']} "
              f"({info['platform']}); {common.versions_line(info)}; bf16 peak "
              f"{peak or 'unknown'} TFLOP/s{f' (measured matmul {measured:.0f})' if measured else ''}; FLOPs analytic (anchor's matmul count); torch: "
              f"{torch_info.get('skipped') or ', '.join(f'{k} {v}' for k, v in torch_info.items())}")
    text = common.table(COLUMNS, rows)
    print(header)
    print(text)
    for r in rows:
        if r.get("ratio vs torch eager"):
            print(f"ratio ours / torch eager at {r['size']} px, batch {r['batch']}, attention {r['attention']}, "
                  f"cls shortcut {r['cls shortcut']}, fp8 {r.get('fp8', 'off')}, fast numerics "
                  f"{r.get('fast numerics', 'off')}: "
                  f"{r['ratio vs torch eager']}")
    out = common.results_path(args)
    if out is not None:
        extra = {k: torch_info[k] for k in ("torch", "transformers") if k in torch_info}
        torch_note = torch_info.get("skipped") or torch_info.get("card")
        common.record(out, f"cmu_step ({args.variant})", info, text, extra_versions=extra,
                      notes=f"FLOPs analytic (matmuls, the anchor's formula); torch: {torch_note}")
    common.write_json(args.json, {"device": info, "torch": torch_info, "rows": rows, "argv": sys.argv})
    return rows


if __name__ == "__main__":
    main()
