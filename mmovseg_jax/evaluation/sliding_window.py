"""Sliding-window inference for tiles larger than the model input (e.g. OEM's 1024x1024).

The release (MMOV.py, `sliding_window`) resizes the tile to 640x640, unfolds 384-px
windows at stride 256 plus one global view (the tile resized to 384), averages the
overlapping window outputs, then averages that 50/50 with the global output; it never
builds the SAR windows. Here the windows are taken at the tile's own resolution, every
window origin is shared by RGB and SAR (the same crop of both), and the last window of
each axis is flush with the border so that every pixel is covered.

- `axis_origins(size, window, stride)` / `window_origins(height, width, window, overlap)`.
- `sliding_window_probabilities(predict_fn, rgb, sar, ...) -> (T, H, W)` float32.

All resizing is bilinear with half-pixel centres and no antialiasing (`resize.py`,
PyTorch's `interpolate(mode="bilinear", align_corners=False)`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from mmovseg_jax.ops.resize import resize_bilinear

PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def window_stride(window: int, overlap: float) -> int:
    """int(window * (1 - overlap)) as the release computes it (384, 1/3 -> 256), at least 1."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    return max(1, int(math.floor(window * (1 - overlap) + 1e-9)))


def axis_origins(size: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis: 0, stride, 2*stride, ... and a last one at
    size - window (flush with the border). [0] if size <= window."""
    if size <= window:
        return [0]
    return list(range(0, size - window, stride)) + [size - window]


def window_origins(height: int, width: int, window: int = 384, overlap: float = 1 / 3) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the windows covering a (height, width) tile, row-major."""
    stride = window_stride(window, overlap)
    return [(y, x) for y in axis_origins(height, window, stride) for x in axis_origins(width, window, stride)]


def _predict_in_chunks(predict_fn: PredictFn, rgb: np.ndarray, sar: np.ndarray, batch_size: int,
                       pad_batches: bool) -> np.ndarray:
    """Runs predict_fn over (N, ...) inputs in chunks; pads the last chunk (repeating its
    last input, outputs dropped) so that a jitted predict_fn sees one batch shape."""
    outputs = []
    for start in range(0, len(rgb), batch_size):
        r, s = rgb[start:start + batch_size], sar[start:start + batch_size]
        n = len(r)
        if pad_batches and n < batch_size:
            r = np.concatenate([r, np.repeat(r[-1:], batch_size - n, axis=0)])
            s = np.concatenate([s, np.repeat(s[-1:], batch_size - n, axis=0)])
        out = np.asarray(predict_fn(r, s), dtype=np.float32)
        if out.ndim != 4 or out.shape[0] != len(r) or out.shape[2:] != r.shape[1:3]:
            raise ValueError(f"predict_fn must return (N, T, {r.shape[1]}, {r.shape[2]}) for N={len(r)}, "
                             f"got {out.shape}")
        outputs.append(out[:n])
    return np.concatenate(outputs)


def sliding_window_probabilities(predict_fn: PredictFn, rgb: np.ndarray, sar: np.ndarray, window: int = 384,
                                 overlap: float = 1 / 3, global_view: bool = True, batch_size: int = 8,
                                 pad_batches: bool = True) -> np.ndarray:
    """(T, H, W) float32 class probabilities of one tile.

    rgb: (H, W, 3) and sar: (H, W) (or (H, W, C)), uint8 or float; both are passed to
    `predict_fn` as float32 with unchanged pixel values. predict_fn(rgb (N, w, w, 3),
    sar (N, w, w)) -> (N, T, w, w) probabilities (w = window). Windows overlapping a pixel
    are averaged; with `global_view` the tile resized to (w, w) is predicted too, its
    output resized back to (H, W) and averaged 50/50 with the windowed result.
    A tile with both sides <= window gets one prediction of the tile resized to (w, w),
    resized back. A tile with only one side shorter than the window is first upscaled
    (aspect kept) so that its short side equals the window; the result is resized back.
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    sar = np.asarray(sar, dtype=np.float32)
    if rgb.shape[:2] != sar.shape[:2]:
        raise ValueError(f"rgb {rgb.shape} and sar {sar.shape} must share (H, W)")
    height, width = rgb.shape[:2]

    def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if image.shape[:2] == size:
            return image
        return resize_bilinear(image, size, axes=(0, 1))

    if height <= window and width <= window:
        out = _predict_in_chunks(predict_fn, resized(rgb, (window, window))[None],
                                 resized(sar, (window, window))[None], 1, False)[0]
        return resize_bilinear(out, (height, width), axes=(-2, -1))
    if min(height, width) < window:
        scale = window / min(height, width)
        size = (max(window, round(height * scale)), max(window, round(width * scale)))
        probs = sliding_window_probabilities(predict_fn, resized(rgb, size), resized(sar, size), window,
                                             overlap, global_view, batch_size, pad_batches)
        return resize_bilinear(probs, (height, width), axes=(-2, -1))

    origins = window_origins(height, width, window, overlap)
    rgb_in = [rgb[y:y + window, x:x + window] for y, x in origins]
    sar_in = [sar[y:y + window, x:x + window] for y, x in origins]  # the same crops as the RGB
    if global_view:
        rgb_in.append(resized(rgb, (window, window)))
        sar_in.append(resized(sar, (window, window)))
    outputs = _predict_in_chunks(predict_fn, np.stack(rgb_in), np.stack(sar_in), batch_size, pad_batches)

    total = np.zeros((outputs.shape[1], height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    for (y, x), out in zip(origins, outputs):
        total[:, y:y + window, x:x + window] += out
        count[y:y + window, x:x + window] += 1
    probs = total / count
    if global_view:
        probs = 0.5 * (probs + resize_bilinear(outputs[-1], (height, width), axes=(-2, -1)))
    return probs
