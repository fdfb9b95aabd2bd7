"""Throughput of the DEF model: inference (tiles/s) and the DEF train step, with MFU.

    python benchmarks/def_step.py                                # release shapes: variant B, 384 px, batch 8, 8 classes
    python benchmarks/def_step.py --attention xla,cudnn --record
    python benchmarks/def_step.py --variant tiny --batch 2 --classes 3 --steps 2 --warmup 1   # seconds on a CPU

Model: `mmovseg.VARIANTS[variant]` (B = the authors' release: CLIP B/16 + RGB and SAR
DINO B/8 at 384 px) in the compute dtype (default bf16), with the chosen attention kernel
in every vision block (CLIP's text tower stays on XLA); random weights from
`common.random_init` (host-side NumPy draws; the values do not change the speed).

- inference: the jitted `Model.logits(rgb, sar, text)` on a batch of CLIP-normalised
  tiles already on the device, class embeddings computed once beforehand (as the
  Segmenter does); output (B, T, 4G, 4G) logits.
- encoders: the same up to what the head reads (`Model.encode_images`: CLIP's dense
  tokens and guidance blocks, both DINOs' patch maps); beside an inference row, the
  difference is the time of the head, the level projections and the cost volume.
- train: `def_stage.make_train_step` as `def_stage.run` builds it (CLIP q/v trainable at
  x0.01, DINOs frozen, BCE on random labels, AdamW), uint8 inputs, one jitted call with
  the state donated. The text tower runs inside the step (it trains).

FLOPs: XLA's cost analysis of the same computation lowered with XLA attention (never
compiled), so rows with cuDNN attention are credited with the same model FLOPs and not
with the padding; every op counts (matmuls and elementwise). "enc TFLOP/tile" is the
analytic matmul count of the three encoders (about 1.29 TFLOP for B at 384, REFERENCE.md
section 6). MFU = TFLOP/s over the card's dense bf16 peak (H100 SXM / H200: 989; else n/a).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402
import hlo_traffic  # noqa: E402
from mmovseg_jax.models import fp8_inference, layers, mmovseg, storage  # noqa: E402
from mmovseg_jax.train import def_stage, optim, sharding  # noqa: E402

def_configs = importlib.import_module("configs.def")  # "def" is a keyword

VARIANTS = {"B": dict(batch=8, classes=8), "B_dino16": dict(batch=8, classes=8), "tiny": dict(batch=2, classes=3),
            "toy": dict(batch=2, classes=2)}


def _toy() -> mmovseg.Config:
    """mmovseg's "tiny" cut down further (2-block encoders, 1-block text tower, no aggregation
    layers) so that the smoke test compiles the train step in seconds on a CPU."""
    cfg = mmovseg.VARIANTS["tiny"]
    clip_cfg = dataclasses.replace(cfg.clip, vision=dataclasses.replace(cfg.clip.vision, depth=2),
                                   text=dataclasses.replace(cfg.clip.text, depth=1))
    return dataclasses.replace(cfg, clip=clip_cfg, dino=dataclasses.replace(cfg.dino, depth=2),
                               head=dataclasses.replace(cfg.head, num_layers=0),
                               clip_guidance_blocks=(0, 1), dino_blocks=(0, 1, 1), image_size=64)
MODES = ("inference", "train", "encoders")
# --fp8: off; on (current scaling, ops/fp8.py); static (inference only: calibrated on one
# random batch and frozen, models/fp8_inference.py); both = off and on; all = the three,
# static before on (a GPU session's stage may run out of time before its last rows).
FP8_MODES = {"off": ("off",), "on": ("on",), "static": ("static",), "both": ("off", "on"),
             "all": ("off", "static", "on")}
COLUMNS = ("mode", "attention", "fp8", "f8 GEMMs", "fast numerics", "remat", "size", "batch", "classes", "step ms",
           "tiles/s", "TFLOP/s", "MFU", "GFLOP/tile", "enc TFLOP/tile", "enc MFU", "enc MFU vs measured", "temp GiB",
           "compile s")


def model_config(variant: str, dtype: str, attention: str, fp8: bool = False,
                 fast_numerics: bool = False) -> mmovseg.Config:
    """The variant's architecture in `dtype` with `attention` in every vision block and,
    with `fp8`, their GEMMs in float8; with `fast_numerics`, common.FAST_NUMERICS."""
    cfg = _toy() if variant == "toy" else mmovseg.VARIANTS[variant]
    fast = common.FAST_NUMERICS if fast_numerics else {}
    return storage.with_kernels(dataclasses.replace(cfg, dtype=dtype), attention, fp8, **fast)


def encoder_flops(cfg: mmovseg.Config) -> float:
    """Analytic matmul FLOPs of CLIP's vision tower and the DINO encoders for one tile."""
    s, v, d = cfg.image_size, cfg.clip.vision, cfg.dino
    total = common.vit_forward_flops((s // v.patch_size) ** 2 + 1, v.width, v.depth, v.mlp_dim, v.patch_size)
    dino_one = common.vit_forward_flops((s // d.patch_size) ** 2 + 1, d.width, d.depth, d.mlp_dim, d.patch_size)
    return total + dino_one * (2 if cfg.use_sar else 1)


def train_config(variant: str, batch: int, dtype: str, remat: str = "none"):
    """configs/def.py "pie_cloud" (the paper's training settings) on random weights, with
    config.remat = `remat`."""
    c = def_configs.get_config("pie_cloud")
    c.model.variant, c.model.dtype, c.model.require_pretrained = variant, dtype, False  # the model is built here
    c.global_batch_size = batch
    c.remat = remat
    return c


def random_tokens(cfg: mmovseg.Config, classes: int, seed: int = 0) -> np.ndarray:
    """(T, P, L) token ids ending in the end-of-text id at a random position."""
    text = cfg.clip.text
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, text.eos_token_id - 1, (classes, len(cfg.templates), text.context_length))
    ends = rng.integers(4, text.context_length, ids.shape[:2])
    ids[np.arange(classes)[:, None], np.arange(ids.shape[1])[None], ends] = text.eos_token_id
    return ids.astype(np.int32)


def build_train(cfg: mmovseg.Config, config, abstract: bool, mesh=None):
    """(jitted train step, state, frozen, mesh) as def_stage.run builds them; with `abstract`
    the model is never materialised (shapes only, for FLOP counting or compiling for
    another backend's `mesh`; default: config.mesh over the local devices)."""
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    make = lambda: mmovseg.Model(cfg, rngs=nnx.Rngs(config.model.seed))  # noqa: E731
    model = nnx.eval_shape(make) if abstract else common.random_init(make, config.model.seed)
    graphdef, trainable, frozen = nnx.split(model, def_stage.is_trainable(config.clip_finetune), ...)
    tx, lr = optim.make(config.optimizer, config.total_steps, def_stage.param_groups(config.clip_lr_multiplier))
    opt_state = jax.eval_shape(tx.init, trainable) if abstract else tx.init(trainable)
    state = common.initial_state(trainable, opt_state)
    if abstract:
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
    state_shardings = sharding.state_shardings(state, mesh, config.mesh.rules)
    if not abstract:
        state = jax.device_put(state, state_shardings)
        frozen = jax.device_put(frozen, sharding.replicated(mesh))
    return def_stage.make_train_step(graphdef, tx, lr, config, mesh, state_shardings), state, frozen, mesh


def train_inputs(cfg: mmovseg.Config, batch: int, classes: int, mesh):
    rng = np.random.default_rng(1)
    s = cfg.image_size
    host = {"rgb": rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8),
            "sar": rng.integers(0, 256, (batch, s, s), dtype=np.uint8),
            "label": rng.integers(0, classes, (batch, s, s), dtype=np.uint8)}
    return sharding.to_global(host, mesh), jax.device_put(random_tokens(cfg, classes), sharding.replicated(mesh))


def freeze_fp8(model: mmovseg.Model, batch: int = 1, seed: int = 3) -> dict:
    """Calibrates the float8 layers on one batch of random tiles and freezes them
    (fp8_inference.prepare); calibration runs with XLA attention, which runs anywhere."""
    s = model.config.image_size
    rng = np.random.default_rng(seed)
    tiles = [jnp.asarray(rng.standard_normal((batch, s, s, 3), np.float32)) for _ in range(2)]
    with common.xla_attention(model):
        return fp8_inference.prepare(model, lambda m, rgb, sar: m.encode_images(rgb, sar if m.config.use_sar else None),
                                     [tuple(tiles)])


def make_infer(cfg: mmovseg.Config, abstract: bool, classes: int, encoders_only: bool = False,
               fp8_static: bool = False):
    """(jitted (state, rgb, sar, text) -> logits, state, text (T, P, E)); with `encoders_only`
    the function stops at what the head reads from the encoders (`Model.encode_images`).
    `fp8_static` (cfg with fp8): float8 layers calibrated and frozen (`freeze_fp8`); the
    model is then built with values even when `abstract`."""
    make = lambda: mmovseg.Model(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    model = nnx.eval_shape(make) if abstract and not fp8_static else common.random_init(make)
    if fp8_static:
        freeze_fp8(model)
    graphdef, state = nnx.split(model)

    def logits(state, rgb, sar, text):
        model = nnx.merge(graphdef, state)
        return model.encode_images(rgb, sar) if encoders_only else model.logits(rgb, sar, text)

    tokens = jnp.asarray(random_tokens(cfg, classes))
    if abstract:
        text = jax.ShapeDtypeStruct((classes, len(cfg.templates), cfg.clip.embed_dim), jnp.float32)
    else:
        text = jax.jit(lambda st, t: nnx.merge(graphdef, st).encode_text(t))(state, tokens)
    return jax.jit(logits), state, text


def lowered_flops(cfg_xla: mmovseg.Config, mode: str, batch: int, classes: int, config) -> float | None:
    """XLA cost-analysis FLOPs of the computation with XLA attention, from shapes alone."""
    s = cfg_xla.image_size
    img = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
    if mode in ("inference", "encoders"):
        fn, state, text = make_infer(cfg_xla, True, classes, mode == "encoders")
        return common.xla_flops(fn.lower(state, img, img if cfg_xla.use_sar else None, text))
    step, state, frozen, mesh = build_train(cfg_xla, config, True)
    u8 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.uint8)  # noqa: E731
    batch_in = {"rgb": u8((batch, s, s, 3)), "sar": u8((batch, s, s)), "label": u8((batch, s, s))}
    tokens = jax.ShapeDtypeStruct((classes, len(cfg_xla.templates), cfg_xla.clip.text.context_length), jnp.int32)
    return common.xla_flops(step.lower(state, frozen, batch_in, tokens))


def bench(mode: str, variant: str, batch: int, classes: int, attention: str, dtype: str, steps: int,
          warmup: int, peak: float | None, measured_peak: float | None = None, profile: bool = False,
          fp8: str = "off", hlo_dir=None, fast_numerics: bool = False, remat: str = "none") -> dict:
    """Compiles and times one mode; with `profile`, splits its device time by XLA op.
    fp8: "off" | "on" | "static" (FP8_MODES). remat: config.remat of a train row."""
    cfg = model_config(variant, dtype, attention, fp8 != "off", fast_numerics)
    s = cfg.image_size
    if mode in ("inference", "encoders"):
        fn, state, text = make_infer(cfg, False, classes, mode == "encoders", fp8 == "static")
        rng = np.random.default_rng(2)
        rgb = jnp.asarray(rng.standard_normal((batch, s, s, 3), np.float32))
        sar = jnp.asarray(rng.standard_normal((batch, s, s, 3), np.float32)) if cfg.use_sar else None
        start = time.perf_counter()
        compiled = fn.lower(state, rgb, sar, text).compile()
        compile_s = time.perf_counter() - start
        step, carry = (lambda _: compiled(state, rgb, sar, text)), None
        seconds, _ = common.time_loop(step, carry, steps, warmup)
    elif fp8 == "static":
        raise ValueError("static float8 scales are for inference only")
    else:
        config = train_config(variant, batch, dtype, remat)
        step, state, frozen, mesh = build_train(cfg, config, False)
        batch_in, tokens = train_inputs(cfg, batch, classes, mesh)
        start = time.perf_counter()
        compiled = step.lower(state, frozen, batch_in, tokens).compile()
        compile_s = time.perf_counter() - start
        step = lambda st: compiled(st, frozen, batch_in, tokens)[0]  # noqa: E731
        seconds, carry = common.time_loop(step, state, steps, warmup)
    hlo = compiled.as_text() if fp8 != "off" or hlo_dir is not None else ""  # rendered once, read twice
    common.write_hlo(hlo_dir, f"def_{variant}_{mode}_b{batch}_{attention}_fp8-{fp8}"
                              f"_fast-{'on' if fast_numerics else 'off'}"
                              + (f"_remat-{remat}" if mode == "train" else ""), hlo)
    # model FLOPs: without remat, so that recomputation is not credited as work
    flops = lowered_flops(model_config(variant, dtype, "xla"), mode, batch, classes, train_config(variant, batch, dtype))
    tflops = flops / seconds / 1e12 if flops else None
    enc_tflops = encoder_flops(cfg) * batch / seconds / 1e12
    row = {"mode": mode, "attention": attention, "fp8": fp8,
           "f8 GEMMs": hlo_traffic.float8_gemms(hlo) if fp8 != "off" else None,
           "fast numerics": "on" if fast_numerics else "off", "remat": remat if mode == "train" else "-",
           "size": s, "batch": batch,
           "classes": classes,
           "step ms": 1e3 * seconds, "tiles/s": batch / seconds, "TFLOP/s": tflops,
           "MFU": common.mfu_text(tflops, peak), "GFLOP/tile": flops / batch / 1e9 if flops else None,
           "enc TFLOP/tile": encoder_flops(cfg) / 1e12, "enc MFU": common.mfu_text(enc_tflops, peak),
           "enc MFU vs measured": common.mfu_text(enc_tflops, measured_peak),
           "temp GiB": common.temp_gib(compiled), "compile s": compile_s}
    if profile:
        row["profile"] = common.kernel_profile(step, carry)
        print(common.profile_text(row["profile"], f"profile: DEF {mode}, batch {batch}, {attention}, fp8 "
                                                  f"{row['fp8']}, fast numerics {row['fast numerics']}"), flush=True)
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="B", choices=sorted(VARIANTS),
                   help="mmovseg.VARIANTS name, or toy (tiny cut down, for smoke tests)")
    p.add_argument("--batch", default=None, help="tiles per step, or a comma list (default 8; tiny: 2)")
    p.add_argument("--classes", type=int, default=None, help="class names T (default 8; tiny: 3)")
    p.add_argument("--modes", default="inference,train",
                   help="comma list of inference, train, encoders (inference up to the head's inputs: with an "
                        "inference row, shows the head's share of the time)")
    p.add_argument("--attention", default="xla", help="comma list of xla, cudnn, auto")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--fp8", default="off", choices=sorted(FP8_MODES),
                   help="float8 GEMMs in the vision encoders' blocks (changes results; off, the default): on = "
                        "current scaling, static = scales calibrated on one random batch and frozen (inference "
                        "only), both = off and on, all = the three; the f8 GEMMs column counts those XLA compiled")
    common.add_fast_numerics_arg(p)
    p.add_argument("--remat", default="none",
                   help=f"config.remat of the train rows, comma list of {', '.join(layers.REMAT_POLICIES)} (a row "
                        "each): what CLIP's towers and the head's blocks recompute in the backward pass; the temp "
                        "GiB column is the compiled step's scratch memory")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--profile", action="store_true", help="also split each row's device time by XLA op")
    p.add_argument("--measure-peak", action="store_true",
                   help="time a bf16 8192^3 matmul first and add encoder MFU against that measured ceiling")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    common.add_output_args(p)
    common.add_hlo_arg(p)
    common.add_cudnn_pad_arg(p)
    args = p.parse_args(argv)
    pad_label = common.apply_cudnn_pad(args.cudnn_pad_multiple)
    batches = [int(b) for b in args.batch.split(",")] if args.batch else [VARIANTS[args.variant]["batch"]]
    classes = args.classes or VARIANTS[args.variant]["classes"]
    modes = [m.strip() for m in args.modes.split(",")]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for a in args.attention.split(","):
        if a.strip() not in layers.ATTENTION_IMPLEMENTATIONS:
            p.error(f"unknown attention {a!r}; choose from {layers.ATTENTION_IMPLEMENTATIONS}")
    remats = [r.strip() for r in args.remat.split(",")]
    for r in remats:
        if r not in layers.REMAT_POLICIES:
            p.error(f"--remat: {r!r} is not one of {', '.join(layers.REMAT_POLICIES)}")

    info = common.device_info()
    measured = common.measured_matmul_tflops() if args.measure_peak else None
    if measured:
        print(f"measured bf16 matmul: {measured:.1f} TFLOP/s", flush=True)
    rows = []
    attentions = [a.strip() for a in args.attention.split(",")]
    runs = [(mode, batch, attention, fp8, fast, remat)
            for mode, batch, attention, fp8, fast in itertools.product(modes, batches, attentions, FP8_MODES[args.fp8],
                                                                       common.ON_OFF[args.fast_numerics])
            for remat in (remats if mode == "train" else ["none"])]
    for mode, batch, attention, fp8, fast, remat in runs:
        try:
            rows.append(bench(mode, args.variant, batch, classes, attention, args.dtype, args.steps,
                              args.warmup, info["peak_tflops"], measured, args.profile, fp8, args.hlo_dir, fast,
                              remat))
        except Exception as e:  # e.g. cuDNN refusing a shape, out of memory: say so and go on
            rows.append({"mode": mode, "attention": attention, "fp8": fp8,
                         "fast numerics": "on" if fast else "off", "remat": remat if mode == "train" else "-",
                         "batch": batch,
                         "classes": classes,
                         "size": model_config(args.variant, args.dtype, "xla").image_size,
                         "step ms": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"})
        print(f"  done: {json.dumps({k: v for k, v in rows[-1].items() if k != 'profile'}, default=str)}",
              flush=True)
    for r in rows:  # a padding other than the default is named in the attention column
        if r["attention"] in ("cudnn", "auto"):
            r["attention"] += pad_label
    header = (f"DEF model ({args.variant}, {args.dtype}); device {info['count']} x {info['kind']} "
              f"({info['platform']}); {common.versions_line(info)}; bf16 peak {info['peak_tflops'] or 'unknown'} "
              f"TFLOP/s{f' (measured matmul {measured:.0f})' if measured else ''}; "
              f"FLOPs: XLA cost analysis with XLA attention")
    text = common.table(COLUMNS, rows)
    print(header)
    print(text)
    out = common.results_path(args)
    if out is not None:
        common.record(out, f"def_step ({args.variant})", info, text,
                      notes="FLOPs: XLA cost analysis of the computation with XLA attention (all ops)")
    common.write_json(args.json, {"device": info, "rows": rows, "argv": sys.argv})
    return rows


if __name__ == "__main__":
    main()
