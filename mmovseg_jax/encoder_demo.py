"""Encoder demo: DINO features and CLIP dense zero-shot labels on a device mesh.

Runs the DINO and CLIP encoders (random weights from a config, or converted
checkpoints) on a batch sharded over every device, tokenises the class prompts with
the real CLIP BPE vocabulary, labels each patch by its most similar prompt, times the
forward passes, and writes `summary.json` (and `labels.png` for a user image) to the
work directory. With converted real checkpoints and `--config.image=tile.png`, this is
CLIP zero-shot segmentation of that tile in the dense mode MM-OVSeg uses.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmovseg_jax.data.preprocess import normalize
from mmovseg_jax.models import clip, dino, storage, tokenizer
from mmovseg_jax.train import sharding


def _build(family: str, cfg: ml_collections.ConfigDict, dtype: str, seed: int):
    """A model from a converted checkpoint folder, or from a named variant with random weights."""
    if cfg.checkpoint:
        return storage.load_model(cfg.checkpoint, expect_family=family, dtype=dtype)
    variants = dino.VARIANTS if family == "dino" else clip.VARIANTS
    if cfg.variant not in variants:
        raise ValueError(f"config.{family}.variant: {cfg.variant!r} is not one of {sorted(variants)}")
    base = variants[cfg.variant]
    if family == "dino":
        config = dataclasses.replace(base, depth=cfg.depth or base.depth, dtype=dtype)
        return dino.Model(config, rngs=nnx.Rngs(seed))
    vision = dataclasses.replace(base.vision, depth=cfg.depth or base.vision.depth)
    text = dataclasses.replace(base.text, depth=cfg.depth or base.text.depth)
    return clip.Model(dataclasses.replace(base, vision=vision, text=text, dtype=dtype), rngs=nnx.Rngs(seed))


def synthetic_tiles(batch: int, size: int, seed: int) -> np.ndarray:
    """Smooth random colour fields, (batch, size, size, 3) uint8: a stand-in scene."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (batch, 8, 8, 3))
    tiles = np.repeat(np.repeat(coarse, -(-size // 8), axis=1), -(-size // 8), axis=2)[:, :size, :size]
    return np.clip(tiles + rng.normal(0, 12, tiles.shape), 0, 255).astype(np.uint8)


def read_image(path: str, size: int) -> np.ndarray:
    """An RGB image resized to (size, size), as (1, size, size, 3) uint8."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))[None]
    except (FileNotFoundError, OSError) as e:
        raise ValueError(f"config.image: cannot read {path!r} ({e})") from e


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the demo; returns (and writes to workdir/summary.json) what it measured."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    classes = [c.strip() for c in config.classes.split(",") if c.strip()]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"config.classes: need distinct, non-empty class names, got {config.classes!r}")
    mesh = sharding.make_mesh()
    pixels = read_image(config.image, config.image_size) if config.image else \
        synthetic_tiles(config.batch_size, config.image_size, config.seed)
    sharding.check_batch_size(pixels.shape[0], mesh, "config.batch_size")

    dino_model = _build("dino", config.dino, config.dtype, config.seed)
    clip_model = _build("clip", config.clip, config.dtype, config.seed + 1)
    tok_folder = config.clip.checkpoint or tokenizer.BUNDLED_BPE
    tokens = tokenizer.load(tok_folder, clip_model.config.text.context_length)(
        [config.template.format(c) for c in classes])
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; batch {pixels.shape[0]} at "
          f"{config.image_size}px; {len(classes)} classes; dtype {config.dtype}")

    dino_blocks = tuple(config.dino_blocks)

    @nnx.jit
    def forward(dino_model, clip_model, pixels, tokens):
        images = normalize(pixels)
        features = dino_model(images, dino_blocks)
        dense = clip_model.encode_image(images, dense=True).dense[:, 1:]
        text = clip_model.encode_text(tokens)
        dense = dense / jnp.linalg.norm(dense, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        similarity = jnp.einsum("bnd,kd->bnk", dense, text)
        return features, similarity

    pixels = jax.device_put(jnp.asarray(pixels), sharding.batch_sharding(mesh))
    start = time.perf_counter()
    features, similarity = jax.block_until_ready(forward(dino_model, clip_model, pixels, tokens))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(config.timed_steps):
        features, similarity = forward(dino_model, clip_model, pixels, tokens)
    jax.block_until_ready(similarity)
    step_s = (time.perf_counter() - start) / max(config.timed_steps, 1)

    grid = config.image_size // clip_model.config.vision.patch_size
    labels = np.asarray(jnp.argmax(similarity, axis=-1)).reshape(-1, grid, grid)
    fractions = {c: float((labels == i).mean()) for i, c in enumerate(classes)}
    summary = {
        "devices": jax.device_count(), "platform": jax.devices()[0].platform, "batch": int(pixels.shape[0]),
        "image_size": config.image_size, "dtype": config.dtype,
        "dino_feature_shapes": [list(f.shape) for f in features],
        "clip_similarity_shape": list(similarity.shape), "label_fractions": fractions,
        "compile_seconds": round(compile_s, 2), "images_per_second": round(pixels.shape[0] / step_s, 2),
        "pixels_sharding": list(pixels.sharding.spec[0]),  # mesh axes splitting the batch
    }
    for i, f in zip(dino_blocks, features):
        print(f"DINO block {i}: tokens {tuple(f.shape)} (CLS first), mean {float(f.mean()):+.4f} std {float(f.std()):.4f}")
    print(f"CLIP dense similarity {tuple(similarity.shape)}; patch labels: "
          + ", ".join(f"{c} {100 * v:.1f}%" for c, v in fractions.items()))
    print(f"compile {compile_s:.1f}s; forward {step_s * 1e3:.1f} ms/batch = {summary['images_per_second']} img/s")
    if config.image:
        from PIL import Image

        palette = np.random.default_rng(0).integers(0, 255, (len(classes), 3), dtype=np.uint8)
        Image.fromarray(palette[labels[0]]).resize((config.image_size,) * 2, Image.NEAREST).save(workdir / "labels.png")
        print(f"wrote {workdir / 'labels.png'}")
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {workdir / 'summary.json'}")
    return summary
