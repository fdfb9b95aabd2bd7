"""The MM-OVSeg DEF model: CLIP + RGB DINO + SAR DINO + the cost-aggregation head.

    rgb, sar (B, S, S, 3) CLIP-normalised  ->  logits (B, T, 4G, 4G) for T class names

CLIP gives dense per-patch embeddings on its G x G grid and, from two visual blocks,
decoder guidance upsampled 2x and 4x. Each DINO encoder gives three levels (patch
tokens after the final norm): the last resampled to G x G with `embed_dim` channels
(the DINO cost map), the other two resampled to 2G and 4G as decoder guidance. RGB
and SAR maps of the same level are added (fusion by addition). With `use_sar=False`
the SAR branch is absent: the paper's RGB-only baseline. The class count comes only
from the text.

Two released architectures (`VARIANTS`):
  "B": CLIP B/16 at 384 (G = 24), DINO v1 B/8 at 384 (48 x 48 tokens; blocks 4, 8, 12);
       levels by a 1x1 conv (2G), a 2x2 transposed conv (4G), a 2x2 stride-2 conv (G).
  "L": CLIP L/14@336 (the 384 tile resized to 336, bilinear, half-pixel: G = 24) and
       DINOv3 L/16 at 384 (24 x 24 patches, registers dropped; blocks 8, 16, 24); levels
       by 2x2 and 4x4 transposed convs (2G, 4G) and a 1x1 conv (G); head width 768.
`dino_family` ("v1" | "v3") says which encoder `dino` configures.

Parameter names (for converters): `clip`, `rgb_dino`, `sar_dino`, `clip_guidance_up`,
`rgb_levels`, `sar_levels`, `head`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmovseg_jax.models import clip, convs, def_head, dino, dinov3, layers
from mmovseg_jax.ops import resize

TEMPLATE = "A photo of a {} in the scene"


DINO_FAMILIES = ("v1", "v3")


def _dino_modules() -> dict[str, tuple[type, type]]:
    """dino_family -> (config class, model class)."""
    return {"v1": (dino.Config, dino.Model), "v3": (dinov3.Config, dinov3.Model)}


def dino_config_from_dict(family: str, d: dict) -> Any:
    """The DINO encoder config of `family` ("v1" | "v3") from its JSON dict (lists -> tuples)."""
    if family not in DINO_FAMILIES:
        raise ValueError(f"dino_family must be one of {DINO_FAMILIES}, got {family!r}")
    cls = _dino_modules()[family][0]
    if hasattr(cls, "from_dict"):
        return cls.from_dict(dict(d))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class Config:
    clip: clip.Config = clip.VARIANTS["B/16"]
    # dino.Config when dino_family is "v1", dinov3.Config when "v3"
    dino: Any = dataclasses.replace(dino.VARIANTS["B/8"], pos_interpolation="dino")
    head: def_head.HeadConfig = def_head.HeadConfig()
    image_size: int = 384  # the model's input tile (what the DINO encoders see)
    use_sar: bool = True
    clip_guidance_blocks: tuple[int, int] = (3, 7)  # 0-based visual blocks for decoder guidance
    dino_blocks: tuple[int, int, int] = (3, 7, 11)  # levels: 2G guidance, 4G guidance, cost map
    templates: tuple[str, ...] = (TEMPLATE,)
    dtype: str = "float32"
    dino_family: str = "v1"  # "v1": DINO (Caron et al.); "v3": DINOv3 (RoPE, registers)
    clip_image_size: int = 0  # CLIP's input size; 0 = image_size, else the tile is resized for CLIP

    @property
    def clip_input_size(self) -> int:
        return self.clip_image_size or self.image_size

    @property
    def clip_grid(self) -> int:
        return self.clip_input_size // self.clip.vision.patch_size

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
        family = d.get("dino_family", "v1")
        return Config(clip=clip.Config.from_dict(d["clip"]), dino=dino_config_from_dict(family, d["dino"]),
                      head=def_head.HeadConfig(**head), image_size=d["image_size"], use_sar=d["use_sar"],
                      clip_guidance_blocks=tuple(d["clip_guidance_blocks"]), dino_blocks=tuple(d["dino_blocks"]),
                      templates=tuple(d["templates"]), dtype=d.get("dtype", "float32"), dino_family=family,
                      clip_image_size=d.get("clip_image_size", 0))


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


def _tiny_v3() -> Config:
    """A small model shaped like "L" for tests: DINOv3 (patch 16, registers) on 128 px tiles
    and a patch-14 CLIP at 112 px, both 8 x 8 grids, so the levels are L's transposed
    2x2 / 4x4 and 1x1 convolutions and CLIP sees a resized tile."""
    vision = clip.VisionConfig(patch_size=14, width=96, depth=4, num_heads=4, mlp_dim=192, image_size=112)
    text = clip.TextConfig(width=64, depth=2, num_heads=2, mlp_dim=128)
    # head width 32 (L's is 64): RoPE periods computed in float32 equal the float64 ones
    dino_cfg = dataclasses.replace(dinov3.VARIANTS["L/16"], width=128, depth=4, num_heads=4, mlp_dim=256,
                                   image_size=128)
    return Config(clip=clip.Config(vision=vision, text=text, embed_dim=64), dino=dino_cfg, dino_family="v3",
                  head=_tiny().head, image_size=128, clip_image_size=112, clip_guidance_blocks=(1, 2),
                  dino_blocks=(1, 2, 3))


def _large() -> Config:
    """The released ViT-L model (paper Appendix D; the release's MMOVL14.py, vitl_336.yaml)."""
    return Config(clip=clip.VARIANTS["L/14@336"], dino=dinov3.VARIANTS["L/16"], dino_family="v3",
                  head=def_head.HeadConfig(embed_dim=768), image_size=384, clip_image_size=336,
                  clip_guidance_blocks=(7, 15), dino_blocks=(7, 15, 23))


# "B": the released model (CLIP B/16 + DINO B/8 at 384); "B_dino16": the paper's prose
# (DINO B/16); "L": the released ViT-L model (CLIP L/14@336 + DINOv3 L/16); "tiny": the
# synthetic default; "tiny_v3": a small model with L's structure, for tests.
VARIANTS: dict[str, Config] = {
    "B": Config(),
    "B_dino16": Config(dino=dataclasses.replace(dino.VARIANTS["B/16"], pos_interpolation="dino")),
    "L": _large(),
    "tiny": _tiny(),
    "tiny_v3": _tiny_v3(),
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

    def __call__(self, maps: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """maps: three (B, d, d, D) patch-token maps -> (2G map, 4G map, G cost map), float32."""
        return (self.level_2g(maps[0]).astype(jnp.float32), self.level_4g(maps[1]).astype(jnp.float32),
                self.cost(maps[2]).astype(jnp.float32))


class Model(nnx.Module):
    def __init__(self, config: Config, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        dtype = layers.compute_dtype(config.dtype)
        if config.dino_family not in DINO_FAMILIES:
            raise ValueError(f"dino_family must be one of {DINO_FAMILIES}, got {config.dino_family!r}")
        dino_config_cls, dino_model_cls = _dino_modules()[config.dino_family]
        if not isinstance(config.dino, dino_config_cls):
            raise ValueError(f"dino_family {config.dino_family!r} needs a {dino_config_cls.__module__}.Config, "
                             f"got {type(config.dino).__module__}.{type(config.dino).__name__}")
        if config.clip_input_size % config.clip.vision.patch_size or config.image_size % config.dino.patch_size:
            raise ValueError(f"CLIP input {config.clip_input_size} / image_size {config.image_size} must be "
                             f"divisible by the CLIP / DINO patch sizes")
        if config.head.num_prompts != len(config.templates):
            raise ValueError(f"head.num_prompts={config.head.num_prompts} but {len(config.templates)} templates")
        clip_cfg = dataclasses.replace(config.clip, dtype=config.dtype)
        dino_cfg = dataclasses.replace(config.dino, dtype=config.dtype)
        self.clip = clip.Model(clip_cfg, rngs=rngs)
        self.rgb_dino = dino_model_cls(dino_cfg, rngs=rngs)
        self.sar_dino = dino_model_cls(dino_cfg, rngs=rngs) if config.use_sar else None
        g2, g4 = config.head.guidance_dims
        width = config.clip.vision.width
        self.clip_guidance_up = nnx.List([convs.Resample(width, g2, 2, dtype=dtype, rngs=rngs),
                                          convs.Resample(width, g4, 4, dtype=dtype, rngs=rngs)])
        self.rgb_levels = DinoLevels(config, dtype=dtype, rngs=rngs)
        self.sar_levels = DinoLevels(config, dtype=dtype, rngs=rngs) if config.use_sar else None
        self.head = def_head.Head(config.head, dtype=dtype, rngs=rngs)

    def encode_text(self, token_ids: jax.Array, remat: str = "none") -> jax.Array:
        """token_ids (T, P, L) -> (T, P, E) L2-normalised class embeddings (P prompt templates).
        `remat`: the text tower's (layers.rematted)."""
        t, p, length = token_ids.shape
        embeds = self.clip.encode_text(token_ids.reshape(t * p, length), remat).reshape(t, p, -1)
        return embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)

    def dino_patch_maps(self, encoder: nnx.Module, images: jax.Array) -> list[jax.Array]:
        """The three DINO levels as (B, d, d, D) maps of normalised patch tokens (CLS and
        registers dropped), d = dino_grid."""
        cfg = self.config
        if cfg.dino_family == "v3":
            tokens = encoder.patch_tokens(images, cfg.dino_blocks)
        else:
            tokens = tuple(x[:, 1:] for x in encoder(images, cfg.dino_blocks, norm=True))
        d = cfg.dino_grid
        return [x.reshape(x.shape[0], d, d, -1) for x in tokens]

    def clip_input(self, rgb: jax.Array) -> jax.Array:
        """The tile as CLIP sees it: resized (bilinear, half-pixel, no antialias, as the
        release's F.interpolate) to clip_input_size when that differs from image_size."""
        size = self.config.clip_input_size
        if rgb.shape[1:3] == (size, size):
            return rgb
        return resize.resize_bilinear(rgb.astype(jnp.float32), (size, size), align_corners=False, axes=(1, 2))

    def encode_images(self, rgb: jax.Array, sar: jax.Array | None, remat: str = "none"):
        """What the head reads from the three encoders: (CLIP's VisionOutput with its dense
        tokens and guidance blocks, the RGB DINO's three patch maps, the SAR DINO's or None).
        rgb, sar: (B, S, S, 3) CLIP-normalised at S = image_size. `remat`: CLIP's vision
        blocks' (layers.rematted); the DINO encoders never train, so keep nothing for a
        backward pass anyway."""
        cfg = self.config
        size = rgb.shape[1:3]
        if size != (cfg.image_size, cfg.image_size):
            raise ValueError(f"expected {cfg.image_size}x{cfg.image_size} inputs, got {size[0]}x{size[1]}")
        if self.sar_dino is not None and sar is None:
            raise ValueError("this model has a SAR branch: pass the SAR tile")
        vision = self.clip.encode_image(self.clip_input(rgb), cfg.clip_guidance_blocks, dense=True, remat=remat)
        rgb_maps = self.dino_patch_maps(self.rgb_dino, rgb)
        sar_maps = self.dino_patch_maps(self.sar_dino, sar) if self.sar_dino is not None else None
        return vision, rgb_maps, sar_maps

    def logits(self, rgb: jax.Array, sar: jax.Array | None, text: jax.Array, remat: str = "none") -> jax.Array:
        """rgb, sar: (B, S, S, 3) CLIP-normalised at S = image_size (sar may be None
        without the SAR branch); text: (T, P, E) from `encode_text`. -> (B, T, 4G, 4G) float32.
        `remat` ("none" | "activation" | "full" | "dots", layers.rematted): what CLIP's vision
        blocks and the head's aggregation and decoder blocks recompute in a backward pass
        instead of keeping (memory for time; the values do not change)."""
        g = self.config.clip_grid
        vision, rgb_maps, sar_maps = self.encode_images(rgb, sar, remat)
        clip_features = vision.dense[:, 1:].reshape(rgb.shape[0], g, g, -1)
        clip_guidance = tuple(up(x[:, 1:].reshape(x.shape[0], g, g, -1)).astype(jnp.float32)
                              for up, x in zip(self.clip_guidance_up, vision.blocks))
        level_2g, level_4g, dino_cost = self.rgb_levels(rgb_maps)
        if sar_maps is not None:
            sar_2g, sar_4g, sar_cost = self.sar_levels(sar_maps)
            level_2g, level_4g, dino_cost = level_2g + sar_2g, level_4g + sar_4g, dino_cost + sar_cost
        return self.head(clip_features, dino_cost, text, clip_guidance, (level_2g, level_4g), remat)

    def __call__(self, rgb: jax.Array, sar: jax.Array | None, token_ids: jax.Array,
                 remat: str = "none") -> jax.Array:
        """`logits` with the text encoded from token_ids (T, P, L); `remat` applies to the
        text tower too."""
        return self.logits(rgb, sar, self.encode_text(token_ids, remat), remat)


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
