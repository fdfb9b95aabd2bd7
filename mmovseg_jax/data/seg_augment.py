"""Augmentation for DEF segmentation training and resizing for its evaluation.

Training (`SegmentationAugment`), per record, as the release's mapper does for RGB +
label but applied to SAR and `valid` as well (the release leaves SAR unflipped/uncropped):

1. resize so the shortest edge is a random integer in `short_edge` (detectron2's
   ResizeShortestEdge "range"; the release uses 384), longest edge capped at `max_size`;
2. random crop_size x crop_size window (uniform position; sides shorter than the crop are
   padded at the bottom/right with 0 images, label 255, valid False);
3. horizontal flip with probability 1/2;
4. photometric jitter on RGB only (brightness, contrast, saturation, each applied with
   probability `jitter_prob`, in the spirit of the release's ColorAugSSD, without hue).

Images are resized bilinearly (PIL, antialiased when shrinking), label and valid by
nearest neighbour; all use pixel-centre alignment, so fields stay co-registered.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from PIL import Image

from mmovseg_jax.data.augment import IGNORE_LABEL, _spatial_size

Record = dict[str, Any]
_FILL = {"rgb": 0, "sar": 0, "label": IGNORE_LABEL, "valid": False}


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> (h, w[, 3]) uint8, bilinear (antialiased when shrinking)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, ...) -> (h, w, ...), nearest neighbour at pixel centres (any dtype)."""
    (height, width), (h, w) = array.shape[:2], size
    ys = np.minimum(((np.arange(h) + 0.5) * (height / h)).astype(np.int64), height - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * (width / w)).astype(np.int64), width - 1)
    return array[ys[:, None], xs[None, :]]


def _resize_record(element: Record, size: tuple[int, int]) -> Record:
    out = dict(element)
    for key in ("rgb", "sar"):
        if key in element:
            out[key] = resize_bilinear(np.asarray(element[key]), size)
    for key in ("label", "valid"):
        if key in element:
            out[key] = resize_nearest(np.asarray(element[key]), size)
    return out


def shortest_edge_size(height: int, width: int, short: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) with min(h, w) = short (aspect kept, rounded), longest edge scaled down to max_size."""
    scale = short / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _window(array: np.ndarray, top: int, left: int, size: int, fill: Any) -> np.ndarray:
    """size x size window at (top, left), padded with `fill` past the bottom/right edge."""
    out = np.full((size, size, *array.shape[2:]), fill, dtype=array.dtype)
    part = array[top:top + size, left:left + size]
    out[:part.shape[0], :part.shape[1]] = part
    return out


def color_jitter(rgb: np.ndarray, rng: np.random.Generator, prob: float, brightness: float = 32.0,
                 contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5)) -> np.ndarray:
    """(H, W, 3) uint8 -> uint8. Each with probability `prob`: add U(-brightness, brightness)
    grey levels; multiply by U(contrast); blend with the pixel's grey by U(saturation)."""
    x = rgb.astype(np.float32)
    if rng.random() < prob:
        x = x + np.float32(rng.uniform(-brightness, brightness))
    if rng.random() < prob:
        x = x * np.float32(rng.uniform(*contrast))
    if rng.random() < prob:
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        alpha = np.float32(rng.uniform(*saturation))
        x = grey[..., None] + alpha * (x - grey[..., None])
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class SegmentationAugment(grain.transforms.RandomMap):
    """Random shortest-edge resize, crop, flip (all fields together) + RGB-only jitter.

    Input record: rgb (H, W, 3) uint8, sar (H, W) uint8, label (H, W) uint8, valid (H, W)
    bool (any subset). Output: the same fields at (S, S) with S = crop_size; other keys
    pass through. Geometry is drawn before jitter, so `jitter_prob` never changes it.
    """

    def __init__(self, crop_size: int = 384, short_edge: int | tuple[int, int] | None = None,
                 max_size: int | None = None, flip: bool = True, jitter_prob: float = 0.5):
        lo, hi = (crop_size, crop_size) if short_edge is None else (
            (short_edge, short_edge) if isinstance(short_edge, int) else short_edge)
        if crop_size <= 0 or not 0 < lo <= hi or not 0.0 <= jitter_prob <= 1.0:
            raise ValueError(f"bad crop_size {crop_size}, short_edge {short_edge} or jitter_prob {jitter_prob}")
        self.crop_size, self.short_edge, self.max_size = int(crop_size), (int(lo), int(hi)), max_size
        self.flip, self.jitter_prob = bool(flip), float(jitter_prob)

    def random_map(self, element: Record, rng: np.random.Generator) -> Record:
        height, width = _spatial_size(element)
        short = int(rng.integers(self.short_edge[0], self.short_edge[1] + 1))
        h, w = shortest_edge_size(height, width, short, self.max_size)
        top = int(rng.integers(0, max(h - self.crop_size, 0) + 1))
        left = int(rng.integers(0, max(w - self.crop_size, 0) + 1))
        mirror = self.flip and rng.random() < 0.5
        out = _resize_record(element, (h, w))
        for key, fill in _FILL.items():
            if key in out:
                window = _window(np.asarray(out[key]), top, left, self.crop_size, fill)
                out[key] = np.ascontiguousarray(window[:, ::-1]) if mirror else window
        if "rgb" in out and self.jitter_prob > 0:
            out["rgb"] = color_jitter(out["rgb"], rng, self.jitter_prob)
        return out

    def __repr__(self) -> str:
        return (f"SegmentationAugment(crop_size={self.crop_size}, short_edge={self.short_edge}, "
                f"max_size={self.max_size}, flip={self.flip}, jitter_prob={self.jitter_prob})")


class SegmentationResize(grain.transforms.Map):
    """Evaluation: rgb and sar resized (bilinear) to the model input, label/valid untouched.

    Output: rgb (S, S, 3) / sar (S, S) uint8 with S = `size` (an int, or (h, w)); label
    and valid keep the tile's full (H, W), so metrics are computed against the original
    labels after the logits are resized back to (H, W), as the release evaluates.
    Batching needs tiles of one size (true of every prepared test split).
    """

    def __init__(self, size: int | tuple[int, int] = 384):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if min(self.size) <= 0:
            raise ValueError(f"bad size {size}")

    def map(self, element: Record) -> Record:
        _spatial_size(element)
        out = dict(element)
        for key in ("rgb", "sar"):
            if key in element:
                out[key] = resize_bilinear(np.asarray(element[key]), self.size)
        return out

    def __repr__(self) -> str:
        return f"SegmentationResize(size={self.size})"
