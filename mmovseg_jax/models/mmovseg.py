"""The MM-OVSeg DEF model: CLIP + RGB DINO + SAR DINO + the cost-aggregation head.

    rgb, sar (B, S, S, 3) CLIP-normalised  ->  logits (B, T, 4G, 4G) for T class names

CLIP (B/16 at 384: G = 24) gives dense per-patch embeddings and, from two visual
blocks, decoder guidance upsampled 2x and 4x. Each DINO encoder (patch 8 at 384: a
48 x 48 grid) gives three levels from blocks 4, 8 and 12 after the final norm:
level 12 resampled to G x G with `embed_dim` channels (the DINO cost map), levels 4
and 8 resampled to 2G and 4G as decoder guidance. RGB and SAR maps of the same level
are added (fusion by addition). With `use_sar=False` the SAR branch is absent: the
paper's RGB-only baseline. The class count comes only from the text.

Parameter names (for converters): `clip`, `rgb_dino`, `sar_dino`, `clip_guidance_up`,
`rgb_levels`, `sar_levels`, `head`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmovseg_jax.models import clip, convs, def_head, dino, layers
from mmovseg_jax.ops import resize

TEMPLATE = "A photo of a {} in the scene"


@dataclasses.dataclass(frozen=True)
class Config:
    clip: clip.Config = clip.VARIANTS["B/16"]
    dino: dino.Config = dataclasses.replace(dino.VARIANTS["B/8"], pos_interpolation="dino")
    head: def_head.HeadConfig = def_head.HeadConfig()
    image_size: int = 384  # the model's input tile
    use_sar: bool = True
    clip_guidance_blocks: tuple[int, int] = (3, 7)  # 0-based visual blocks for decoder guidance
    dino_blocks: tuple[int, int, int] = (3, 7, 11)  # levels: 2G guidance, 4G guidance, cost map
    templates: tuple[str, ...] = (TEMPLATE,)
    dtype: str = "float32"

    @property
    def clip_grid(self) -> int:
        return self.image_size // self.clip.vision.patch_size

    @property
    def dino_grid(self) -> int:
        return self.image_size // self.dino.patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        head = dict(d.get("head", {}))
        for key in ("pooling", "decoder_dims", "guidance_dims", "clip_guidance_proj_dims", "dino_guidance_proj_dims"):
            if key in head:
                head[key] = tuple(head[key])
        return Config(clip=clip.Config.from_dict(d["clip"]), dino=dino.Config(**d["dino"]),
                      head=def_head.HeadConfig(**head), image_size=d["image_size"], use_sar=d["use_sar"],
                      clip_guidance_blocks=tuple(d["clip_guidance_blocks"]), dino_blocks=tuple(d["dino_blocks"]),
                      templates=tuple(d["templates"]), dtype=d.get("dtype", "float32"))


def _tiny() -> Config:
    """A small model for the synthetic world and tests: 128 px tiles, G = 8."""
    vision = clip.VisionConfig(patch_size=16, width=96, depth=4, num_heads=4, mlp_dim=192, image_size=128)
    text = clip.TextConfig(width=64, depth=2, num_heads=2, mlp_dim=128)
    return Config(clip=clip.Config(vision=vision, text=text, embed_dim=64),
                  dino=dino.Config(patch_size=8, width=96, depth=4, num_heads=4, mlp_dim=192, image_size=128,
                                   pos_interpolation="dino"),
                  head=def_head.HeadConfig(embed_dim=64, hidden_dim=64, window=4, appearance_proj_dim=32,
                                           text_proj_dim=32, decoder_dims=(32, 16), guidance_dims=(64, 32),
                                           clip_guidance_proj_dims=(16, 16), dino_guidance_proj_dims=(16, 16)),
                  image_size=128, clip_guidance_blocks=(1, 2), dino_blocks=(1, 2, 3))


# "B": the released model (CLIP B/16 + DINO B/8 at 384); "B_dino16": the paper's prose
# (DINO B/16); "tiny": the synthetic default.
VARIANTS: dict[str, Config] = {
    "B": Config(),
    "B_dino16": Config(dino=dataclasses.replace(dino.VARIANTS["B/16"], pos_interpolation="dino")),
    "tiny": _tiny(),
}


def _factor(source: int, target: int) -> int:
    """Resample factor taking a source grid to a target grid (see convs.Resample)."""
    if target >= source:
        if target % source:
            raise ValueError(f"cannot resample a {source}-grid to {target}")
        return target // source
    if source % target:
        raise ValueError(f"cannot resample a {source}-grid to {target}")
    return -(source // target)


class DinoLevels(nnx.Module):
    """Projections of one DINO encoder's three levels to the head's grids and widths."""

    def __init__(self, cfg: Config, *, dtype, rngs: nnx.Rngs):
        g, d = cfg.clip_grid, cfg.dino_grid
        width, head = cfg.dino.width, cfg.head
        self.level_2g = convs.Resample(width, head.guidance_dims[0], _factor(d, 2 * g), dtype=dtype, rngs=rngs)
        self.level_4g = convs.Resample(width, head.guidance_dims[1], _factor(d, 4 * g), dtype=dtype, rngs=rngs)
        self.cost = convs.Resample(width, head.embed_dim, _factor(d, g), dtype=dtype, rngs=rngs)

    def __call__(self, blocks: Sequence[jax.Array], grid: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """blocks: three (B, 1 + grid^2, D) token sequences -> (2G map, 4G map, G cost map), float32."""
        maps = [x[:, 1:].reshape(x.shape[0], grid, grid, -1) for x in blocks]
        return (self.level_2g(maps[0]).astype(jnp.float32), self.level_4g(maps[1]).astype(jnp.float32),
                self.cost(maps[2]).astype(jnp.float32))


class Model(nnx.Module):
    def __init__(self, config: Config, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        dtype = layers.compute_dtype(config.dtype)
        if config.image_size % config.clip.vision.patch_size or config.image_size % config.dino.patch_size:
            raise ValueError(f"image_size {config.image_size} must be divisible by the CLIP and DINO patch sizes")
        if config.head.num_prompts != len(config.templates):
            raise ValueError(f"head.num_prompts={config.head.num_prompts} but {len(config.templates)} templates")
        clip_cfg = dataclasses.replace(config.clip, dtype=config.dtype)
        dino_cfg = dataclasses.replace(config.dino, dtype=config.dtype)
        self.clip = clip.Model(clip_cfg, rngs=rngs)
        self.rgb_dino = dino.Model(dino_cfg, rngs=rngs)
        self.sar_dino = dino.Model(dino_cfg, rngs=rngs) if config.use_sar else None
        g2, g4 = config.head.guidance_dims
        width = config.clip.vision.width
        self.clip_guidance_up = nnx.List([convs.Resample(width, g2, 2, dtype=dtype, rngs=rngs),
                                          convs.Resample(width, g4, 4, dtype=dtype, rngs=rngs)])
        self.rgb_levels = DinoLevels(config, dtype=dtype, rngs=rngs)
        self.sar_levels = DinoLevels(config, dtype=dtype, rngs=rngs) if config.use_sar else None
        self.head = def_head.Head(config.head, dtype=dtype, rngs=rngs)

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        """token_ids (T, P, L) -> (T, P, E) L2-normalised class embeddings (P prompt templates)."""
        t, p, length = token_ids.shape
        embeds = self.clip.encode_text(token_ids.reshape(t * p, length)).reshape(t, p, -1)
        return embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)

    def _dino(self, encoder: dino.Model, levels: DinoLevels, images: jax.Array):
        blocks = encoder(images, self.config.dino_blocks, norm=True)
        return levels(blocks, self.config.dino_grid)

    def logits(self, rgb: jax.Array, sar: jax.Array | None, text: jax.Array) -> jax.Array:
        """rgb, sar: (B, S, S, 3) CLIP-normalised at S = image_size (sar may be None
        without the SAR branch); text: (T, P, E) from `encode_text`. -> (B, T, 4G, 4G) float32."""
        cfg = self.config
        size = rgb.shape[1:3]
        if size != (cfg.image_size, cfg.image_size):
            raise ValueError(f"expected {cfg.image_size}x{cfg.image_size} inputs, got {size[0]}x{size[1]}")
        g = cfg.clip_grid
        vision = self.clip.encode_image(rgb, cfg.clip_guidance_blocks, dense=True)
        clip_features = vision.dense[:, 1:].reshape(rgb.shape[0], g, g, -1)
        clip_guidance = tuple(up(x[:, 1:].reshape(x.shape[0], g, g, -1)).astype(jnp.float32)
                              for up, x in zip(self.clip_guidance_up, vision.blocks))
        level_2g, level_4g, dino_cost = self._dino(self.rgb_dino, self.rgb_levels, rgb)
        if self.sar_dino is not None:
            if sar is None:
                raise ValueError("this model has a SAR branch: pass the SAR tile")
            sar_2g, sar_4g, sar_cost = self._dino(self.sar_dino, self.sar_levels, sar)
            level_2g, level_4g, dino_cost = level_2g + sar_2g, level_4g + sar_4g, dino_cost + sar_cost
        return self.head(clip_features, dino_cost, text, clip_guidance, (level_2g, level_4g))

    def __call__(self, rgb: jax.Array, sar: jax.Array | None, token_ids: jax.Array) -> jax.Array:
        """`logits` with the text encoded from token_ids (T, P, L)."""
        return self.logits(rgb, sar, self.encode_text(token_ids))


def class_prompts(classes: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """The prompt strings (T lists of P) for class names; "a, b" names use their first
    synonym, as the release does."""
    if not classes:
        raise ValueError("the class list is empty")
    dupes = sorted({c for c in classes if list(classes).count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate class names: {', '.join(dupes)}")
    return [[t.format(c.split(", ")[0]) for t in templates] for c in classes]


def tokenize_classes(tokenizer, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(T, P, L) int32 token ids of every class under every template."""
    prompts = class_prompts(classes, templates)
    flat = tokenizer([p for row in prompts for p in row])
    return flat.reshape(len(classes), len(templates), -1)


def probabilities(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Sigmoid of logits (B, T, h, w), resized bilinearly (half-pixel, no antialias) to (B, T, *size)."""
    return resize.resize_bilinear(jax.nn.sigmoid(logits), size, align_corners=False, axes=(2, 3))


def load(folder: str) -> Model:
    """Builds a Model from a folder written by `convert.to_flax` or by training."""
    from mmovseg_jax.models import storage

    return storage.load_model(folder, expect_family="mmovseg")
