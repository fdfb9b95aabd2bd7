"""Paired geometric augmentation for co-registered RGB + SAR (+ label / valid) records.

Every spatial field of a record goes through the same geometry, so optical, SAR and
labels stay aligned (the official release flips/crops RGB and labels but not SAR).
Spatial fields: ``rgb`` (H, W, 3) and ``sar`` (H, W) (bilinear, fill 0), ``label``
(H, W) (nearest, fill 255 = ignore) and ``valid`` (H, W) bool (nearest, fill False).
Other entries (e.g. ``index``) pass through unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

IGNORE_LABEL = 255
_BILINEAR_FIELDS = ("rgb", "sar")
_NEAREST_FILL = {"label": IGNORE_LABEL, "valid": False}

Record = dict[str, Any]


def _spatial_size(element: Record) -> tuple[int, int]:
    """(H, W) shared by the record's spatial fields; raises if they disagree."""
    sizes = {k: np.shape(element[k])[:2] for k in (*_BILINEAR_FIELDS, *_NEAREST_FILL) if k in element}
    if not sizes:
        raise KeyError(f"record has none of the spatial fields {(*_BILINEAR_FIELDS, *_NEAREST_FILL)}")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"spatial fields differ in size: {sizes}")
    return next(iter(sizes.values()))


def _output_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel offsets from the crop centre: (qy, qx), each (size, size) float32."""
    q = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2)
    return np.broadcast_to(q[:, None], (size, size)), np.broadcast_to(q[None, :], (size, size))


def _tap_indices(coord: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower tap index into a 1-pixel fill-padded axis and the weight of the upper tap.

    Coordinates at or beyond one pixel outside the source land wholly on the padding."""
    c = np.clip(coord + 1, 0, length + 1)
    i0 = np.minimum(c.astype(np.int64), length)
    return i0, (c - i0).astype(np.float32)


def bilinear_sample(image: np.ndarray, sy: np.ndarray, sx: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Samples image (H, W, C) at float source coordinates sy, sx (S, S) -> (S, S, C) float32.

    Pixel centres are at integer coordinates; outside the source the value blends to `fill`."""
    h, w, c = image.shape
    padded = np.pad(image.astype(np.float32, copy=False), ((1, 1), (1, 1), (0, 0)), constant_values=fill)
    flat = padded.reshape(-1, c)
    y0, fy = _tap_indices(sy, h)
    x0, fx = _tap_indices(sx, w)
    i = y0 * (w + 2) + x0
    fy, fx = fy[..., None], fx[..., None]
    top = flat[i] * (1 - fx) + flat[i + 1] * fx
    bottom = flat[i + w + 2] * (1 - fx) + flat[i + w + 3] * fx
    return top * (1 - fy) + bottom * fy


def nearest_sample(image: np.ndarray, sy: np.ndarray, sx: np.ndarray, fill: Any) -> np.ndarray:
    """Samples image (H, W) at the nearest pixel to (sy, sx) (S, S) -> (S, S), same dtype; `fill` outside."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((1, 1), (1, 1)), constant_values=fill)
    yi = np.clip(np.floor(sy + 0.5).astype(np.int64) + 1, 0, h + 1)
    xi = np.clip(np.floor(sx + 0.5).astype(np.int64) + 1, 0, w + 1)
    return padded[yi, xi]


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float samples -> dtype, rounding and clipping for integer types."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.floor(values + 0.5), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def warp_record(element: Record, sy: np.ndarray, sx: np.ndarray) -> Record:
    """Resamples every spatial field of `element` at source coordinates (sy, sx), each (S, S).

    rgb/sar bilinear (fill 0), label/valid nearest (fill 255/False); other keys copied."""
    out = dict(element)
    fields = [k for k in _BILINEAR_FIELDS if k in element]
    if fields:
        arrays = [np.asarray(element[k]) for k in fields]
        stacked = np.concatenate([a.reshape(*a.shape[:2], -1) for a in arrays], axis=-1)
        sampled = bilinear_sample(stacked, sy, sx)
        start = 0
        for key, a in zip(fields, arrays):
            depth = 1 if a.ndim == 2 else a.shape[2]
            part = sampled[..., start:start + depth]
            out[key] = _to_dtype(part.reshape(*sy.shape, *a.shape[2:]), a.dtype)
            start += depth
    for key, fill in _NEAREST_FILL.items():
        if key in element:
            out[key] = nearest_sample(np.asarray(element[key]), sy, sx, fill)
    return out


class PairedAugment(grain.transforms.RandomMap):
    """Random similarity warp + crop, identical for every spatial field of a record.

    Per record: scale s ~ log-uniform(scale), rotation ~ U(-max_rotation_deg, max_rotation_deg),
    horizontal flip with probability 1/2 (if `flip`), translation ~ U(-translate, translate)
    times the scaled tile size, and a uniformly placed crop_size x crop_size window (integer
    position in the scaled frame, so scale 1 without rotation/translation is an exact crop).
    Output: the record with rgb (S, S, 3) / sar (S, S) uint8, label (S, S) / valid (S, S).
    """

    def __init__(self, crop_size: int, scale: tuple[float, float] = (0.8, 1.25), max_rotation_deg: float = 180.0,
                 flip: bool = True, translate: float = 0.1):
        if crop_size <= 0 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"bad crop_size {crop_size} or scale {scale}")
        self.crop_size = int(crop_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.max_rotation_deg = float(max_rotation_deg)
        self.flip = bool(flip)
        self.translate = float(translate)

    def sample_coordinates(self, rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Draws one geometry; returns source coordinates (sy, sx), each (S, S) float32."""
        s = math.exp(rng.uniform(math.log(self.scale[0]), math.log(self.scale[1])))
        theta = math.radians(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg))
        mirror = self.flip and rng.random() < 0.5
        size = self.crop_size
        offset = []
        for extent in (s * height, s * width):
            room = extent - size
            top = rng.integers(0, math.floor(room) + 1) if room >= 0 else room / 2
            shift = rng.uniform(-self.translate, self.translate) * extent
            offset.append(top - room / 2 + shift)
        # Output offset q (from crop centre) -> transformed offset z = q + offset -> undo rotation,
        # flip, scale -> source offset from the source centre.
        qy, qx = _output_grid(size)
        zy, zx = qy + np.float32(offset[0]), qx + np.float32(offset[1])
        c, si = math.cos(theta), math.sin(theta)
        ry, rx = c * zy - si * zx, si * zy + c * zx
        if mirror:
            rx = -rx
        sy = ry / np.float32(s) + np.float32((height - 1) / 2)
        sx = rx / np.float32(s) + np.float32((width - 1) / 2)
        return sy.astype(np.float32), sx.astype(np.float32)

    def random_map(self, element: Record, rng: np.random.Generator) -> Record:
        """Warps and crops all spatial fields of `element` with one random geometry."""
        height, width = _spatial_size(element)
        sy, sx = self.sample_coordinates(rng, height, width)
        return warp_record(element, sy, sx)

    def __repr__(self) -> str:
        return (f"PairedAugment(crop_size={self.crop_size}, scale={self.scale}, max_rotation_deg="
                f"{self.max_rotation_deg}, flip={self.flip}, translate={self.translate})")


def _center_window(arr: np.ndarray, size: int, fill: Any) -> np.ndarray:
    """Central size x size window of arr (H, W, ...); padded with `fill` where arr is smaller."""
    h, w = arr.shape[:2]
    out = np.full((size, size, *arr.shape[2:]), fill, dtype=arr.dtype)
    top, left = (h - size) // 2, (w - size) // 2
    src = arr[max(top, 0):max(top, 0) + size, max(left, 0):max(left, 0) + size]
    dy, dx = max(-top, 0), max(-left, 0)
    out[dy:dy + src.shape[0], dx:dx + src.shape[1]] = src
    return out


class CenterCrop(grain.transforms.Map):
    """Deterministic central crop_size x crop_size window of every spatial field (evaluation).

    Tiles smaller than crop_size are padded centrally (0 for images, 255 label, False valid)."""

    def __init__(self, crop_size: int):
        if crop_size <= 0:
            raise ValueError(f"bad crop_size {crop_size}")
        self.crop_size = int(crop_size)

    def map(self, element: Record) -> Record:
        """Returns the record with every spatial field cut to (S, S[, C])."""
        _spatial_size(element)
        out = dict(element)
        fills = {**{k: 0 for k in _BILINEAR_FIELDS}, **_NEAREST_FILL}
        for key, fill in fills.items():
            if key in element:
                out[key] = _center_window(np.asarray(element[key]), self.crop_size, fill)
        return out

    def __repr__(self) -> str:
        return f"CenterCrop(crop_size={self.crop_size})"
