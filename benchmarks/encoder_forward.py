"""Encoder forward throughput: our Flax encoders, and transformers' PyTorch models beside them.

    python benchmarks/encoder_forward.py                       # CPU-sized defaults
    python benchmarks/encoder_forward.py --models dino_b16,dino_b8,clip_b16 \
        --size 224 --batch 64 --dtype bfloat16 --torch --record

Prints one row per (model, implementation): images/s, ms per batch and the achieved
TFLOP/s (analytic count of the matrix multiplies). Random weights; the same
architecture on both sides. `--record` appends the table to benchmarks/RESULTS.md with
the date, device and library versions. Inference only (no gradients).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mmovseg_jax.models import clip, dino  # noqa: E402

MODELS = {
    "dino_s16": ("dino", "S/16"), "dino_b16": ("dino", "B/16"), "dino_b8": ("dino", "B/8"),
    "clip_b16": ("clip", "B/16"), "clip_b16_dense": ("clip", "B/16"), "clip_l14": ("clip", "L/14"),
}


def vit_flops(width: int, depth: int, mlp: int, patch: int, size: int) -> float:
    """Forward FLOPs of one image through a ViT's patch embedding and blocks."""
    tokens = (size // patch) ** 2 + 1
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    return depth * per_block + 2 * tokens * 3 * patch * patch * width


def _arch(name: str, depth: int | None):
    family, variant = MODELS[name]
    cfg = (dino.VARIANTS if family == "dino" else clip.VARIANTS)[variant]
    vis = cfg if family == "dino" else cfg.vision
    if depth:
        vis = dataclasses.replace(vis, depth=depth)
        cfg = vis if family == "dino" else dataclasses.replace(cfg, vision=vis)
    return family, cfg, vis


def _time(fn, steps: int) -> float:
    fn()  # compile / warm up
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out) if not hasattr(out, "cpu") else None
    return (time.perf_counter() - start) / steps


def bench_jax(name: str, size: int, batch: int, dtype: str, steps: int, depth: int | None) -> float:
    family, cfg, vis = _arch(name, depth)
    if family == "dino":
        model = dino.Model(dataclasses.replace(cfg, dtype=dtype), rngs=nnx.Rngs(0))
        run = nnx.jit(lambda m, x: m(x, (-1,))[0])
        encoder = model
    else:
        encoder = clip.VisionTower(vis, cfg.embed_dim, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
        dense = name.endswith("dense")
        run = nnx.jit(lambda m, x: m(x, dense=dense).dense if dense else m(x).image_embed)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)

    def step():
        return jax.block_until_ready(run(encoder, x))

    return _time(step, steps)


def bench_torch(name: str, size: int, batch: int, dtype: str, steps: int, depth: int | None) -> float | None:
    try:
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel
    except ImportError:
        return None
    if name.endswith("dense"):
        return None  # transformers has no dense mode
    family, cfg, vis = _arch(name, depth)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if family == "dino":
        conf = ViTConfig(hidden_size=vis.width, num_hidden_layers=vis.depth, num_attention_heads=vis.num_heads,
                         intermediate_size=vis.mlp_dim, image_size=vis.image_size, patch_size=vis.patch_size)
        model = ViTModel(conf, add_pooling_layer=False)
    else:
        conf = CLIPVisionConfig(hidden_size=vis.width, num_hidden_layers=vis.depth, num_attention_heads=vis.num_heads,
                                intermediate_size=vis.mlp_dim, image_size=vis.image_size, patch_size=vis.patch_size)
        model = CLIPVisionModel(conf)
    conf._attn_implementation = "sdpa"
    model = model.to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with torch.no_grad(), autocast:
            out = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return _time(step, steps)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dino_s16,clip_b16_dense", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--depth", type=int, default=None, help="override the block count (smoke tests)")
    p.add_argument("--torch", action="store_true", help="also time transformers' PyTorch model")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        _, _, vis = _arch(name, args.depth)
        flops = vit_flops(vis.width, vis.depth, vis.mlp_dim, vis.patch_size, args.size) * args.batch
        impls = [("jax", bench_jax)] + ([("torch", bench_torch)] if args.torch else [])
        for impl, fn in impls:
            sec = fn(name, args.size, args.batch, args.dtype, args.steps, args.depth)
            if sec is None:
                continue
            rows.append(dict(model=name, impl=impl, dtype=args.dtype, batch=args.batch, size=args.size,
                             img_s=args.batch / sec, ms=1e3 * sec, tflops=flops / sec / 1e12))
    device = jax.devices()[0].device_kind
    header = "| model | impl | dtype | batch | size | img/s | ms/batch | TFLOP/s |\n|---|---|---|---|---|---|---|---|"
    lines = [f"| {r['model']} | {r['impl']} | {r['dtype']} | {r['batch']} | {r['size']} | {r['img_s']:.1f} | "
             f"{r['ms']:.1f} | {r['tflops']:.2f} |" for r in rows]
    table = "\n".join([header, *lines])
    print(f"device: {device}; jax {jax.__version__}")
    print(table)
    if args.record:
        import flax

        versions = f"jax {jax.__version__}, flax {flax.__version__}"
        try:
            import torch
            import transformers

            versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
        except ImportError:
            pass
        results = Path(__file__).resolve().parent / "RESULTS.md"
        with results.open("a") as f:
            f.write(f"\n## encoder_forward, {datetime.date.today()}, {device} ({platform.node()})\n\n"
                    f"{versions}; command: `{' '.join(sys.argv)}`\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
