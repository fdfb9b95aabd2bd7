"""Encoder demo: DINO + CLIP forward on a device mesh (see mmovseg_jax/encoder_demo.py).

    python -m mmovseg_jax.main --config configs/encoders.py --workdir /tmp/encoders
    python -m mmovseg_jax.main --config configs/encoders.py:base --workdir /tmp/encoders
    python -m mmovseg_jax.main --config configs/encoders.py --workdir /tmp/zs \
        --config.clip.checkpoint=/models/clip_b16_flax --config.image=tile.png \
        --config.classes="water,forest,city,farmland,road"

Variants: "" (default; small random-weight models, seconds on a laptop CPU) and
"base" (DINO ViT-B/16 and CLIP ViT-B/16 at full size, random weights).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "small"
    if variant not in ("small", "base"):
        raise ValueError(f"unknown variant {variant!r} of configs/encoders.py; choose small or base")
    c = ml_collections.ConfigDict()
    c.job = "encoder_demo"
    c.seed = 0
    c.batch_size = 8
    c.image_size = 224
    c.dtype = "float32"  # or "bfloat16" (parameters stay float32)
    c.timed_steps = 3
    c.image = ""  # path of an RGB image to label (batch of one); empty: synthetic tiles
    c.classes = "water,forest,city,farmland,bare soil"
    c.template = "A photo of a {} in the scene"
    c.dino_blocks = (3, 7, 11) if variant == "base" else (1, 3)
    # Each encoder: a converted checkpoint folder, or a variant with random weights.
    c.dino = ml_collections.ConfigDict(dict(checkpoint="", variant="B/16" if variant == "base" else "S/16",
                                            depth=0 if variant == "base" else 4))
    c.clip = ml_collections.ConfigDict(dict(checkpoint="", variant="B/16",
                                            depth=0 if variant == "base" else 2))
    return c
