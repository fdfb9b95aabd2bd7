"""Segmenting optical + SAR tiles with a trained MM-OVSeg model, for any class list.

    seg = Segmenter.load("model_folder")
    probs = seg.probabilities(rgb, sar, ["water", "road", "forest"])   # (T, H, W) float32
    mask = seg.predict(rgb, sar, ["water", "road", "forest"])          # (H, W) uint8

Inputs are uint8 (or float on the 0-255 scale) RGB (H, W, 3) and SAR (H, W) tiles.
Preprocessing is the release's: both are CLIP mean/std normalised, SAR is replicated to
three channels. A tile with both sides <= the model's input size S is resized to S x S
(bilinear, half-pixel centres, as the release's F.interpolate), predicted, and the
sigmoid probabilities are resized back; larger tiles go through
`sliding_window_probabilities` with S-px windows, RGB and SAR cropped identically.

Text embeddings are cached per tuple of class names, so a test-time class list never
reuses the embeddings of another list (the release's cache keeps the training classes).
The forward is jitted once per (config, input shape, class count); the cache is shared
by every Segmenter holding a model of the same architecture.

Float8 (H100/H200 speed; changes results, off by default): `Segmenter.load(folder,
fp8=True)` runs the vision encoders' block GEMMs in float8 with current scaling (bf16
compute); `seg.calibrate_fp8(tiles)` then fixes every float8 layer's input range from
representative tiles (models/fp8_inference.py), so later calls take no amax and read
float8 kernels stored once. `seg.fp8` says which form runs: "off", "on" or "static".
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmovseg_jax.data import preprocess
from mmovseg_jax.evaluation.sliding_window import sliding_window_probabilities, window_origins
from mmovseg_jax.models import fp8_inference, mmovseg
from mmovseg_jax.ops.resize import resize_bilinear

TEXT_CACHE_SIZE = 32  # class lists whose embeddings are kept


@dataclasses.dataclass(frozen=True, eq=False)
class _Graph:
    """A model's graph definition as a static jit argument: hashed by its config,
    equal when configs and graph definitions are (GraphDef itself is not hashable)."""

    config: mmovseg.Config
    graphdef: Any

    def __hash__(self) -> int:
        return hash(self.config)

    def __eq__(self, other) -> bool:
        return (isinstance(other, _Graph) and self.config == other.config
                and self.graphdef == other.graphdef)


@functools.partial(jax.jit, static_argnames=("graph",))
def _encode_text(graph: _Graph, state, token_ids: jax.Array) -> jax.Array:
    """token_ids (T, P, L) -> (T, P, E) float32 L2-normalised embeddings."""
    return nnx.merge(graph.graphdef, state).encode_text(token_ids).astype(jnp.float32)


def _to_model_input(pixels: jax.Array, size: int) -> jax.Array:
    """(N, H, W, 3) 0-255 pixels -> (N, size, size, 3) CLIP-normalised (normalise, then resize)."""
    x = preprocess.normalize(pixels)
    if x.shape[1:3] != (size, size):
        x = resize_bilinear(x, (size, size), align_corners=False, axes=(1, 2))
    return x


@functools.partial(jax.jit, static_argnames=("graph", "out_size"))
def _forward(graph: _Graph, state, rgb: jax.Array, sar: jax.Array | None, text: jax.Array,
             out_size: tuple[int, int]) -> jax.Array:
    """rgb (N, H, W, 3), sar (N, H, W) or None, 0-255 pixels; text (T, P, E)
    -> (N, T, *out_size) float32 probabilities (logits -> sigmoid -> S x S -> out_size)."""
    model = nnx.merge(graph.graphdef, state)
    size = graph.config.image_size
    rgb_in = _to_model_input(rgb, size)
    sar_in = None if sar is None else _to_model_input(preprocess.sar_as_rgb(sar), size)
    probs = mmovseg.probabilities(model.logits(rgb_in, sar_in, text), (size, size)).astype(jnp.float32)
    if out_size != (size, size):
        probs = resize_bilinear(probs, out_size, align_corners=False, axes=(2, 3))
    return probs


def window_count(height: int, width: int, window: int, overlap: float, global_view: bool) -> int:
    """Model inputs `sliding_window_probabilities` runs for a (height, width) tile."""
    if height <= window and width <= window:
        return 1
    if min(height, width) < window:
        scale = window / min(height, width)
        height, width = max(window, round(height * scale)), max(window, round(width * scale))
    return len(window_origins(height, width, window, overlap)) + int(global_view)


def _check_pixels(x: Any, name: str) -> np.ndarray:
    """Numeric, finite array (any real dtype, 0-255 scale)."""
    x = np.asarray(x)
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{name}: expected uint8 (or real) pixels, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError(f"{name}: holds {int(np.size(x) - np.isfinite(x).sum())} non-finite values")
    return x


def _full_batches(inputs: Iterable[tuple[np.ndarray, np.ndarray | None]], size: int
                  ) -> Iterator[tuple[jax.Array, jax.Array | None]]:
    """(rgb (n, S, S, 3), sar (n, S, S) or None) arrays of any n -> batches of exactly
    `size` rows, in order, holding at most one batch and the first `size` rows at a time;
    the last batch wraps round to the first rows (one compiled shape; maxima unchanged)."""
    pending: list[tuple[np.ndarray, np.ndarray | None]] = []  # single rows
    head: list[tuple[np.ndarray, np.ndarray | None]] = []

    def batch(rows):
        rgb = jnp.asarray(np.stack([r for r, _ in rows]))
        return rgb, None if rows[0][1] is None else jnp.asarray(np.stack([s for _, s in rows]))

    for rgb, sar in inputs:
        for i in range(len(rgb)):
            row = (rgb[i], None if sar is None else sar[i])
            pending.append(row)
            if len(head) < size:
                head.append(row)
            if len(pending) == size:
                yield batch(pending)
                pending = []
    if pending:
        yield batch(pending + [head[i % len(head)] for i in range(size - len(pending))])


def _check_pair(rgb: Any, sar: Any, needs_sar: bool, batched: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Validates rgb (…, H, W, 3) and sar (…, H, W) / (…, H, W, 1); returns sar as (…, H, W)."""
    lead = "N, " if batched else ""
    rgb = _check_pixels(rgb, "rgb")
    if rgb.ndim != 3 + batched or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be ({lead}H, W, 3), got shape {rgb.shape}")
    if 0 in rgb.shape:
        raise ValueError(f"rgb is empty: shape {rgb.shape}")
    if sar is None:
        if needs_sar:
            raise ValueError("this model has a SAR branch: pass the SAR tile")
        return rgb, None
    sar = _check_pixels(sar, "sar")
    if sar.ndim == 3 + batched and sar.shape[-1] == 1:
        sar = sar[..., 0]
    if sar.ndim != 2 + batched:
        raise ValueError(f"sar must be single-band ({lead}H, W) or ({lead}H, W, 1), got shape {sar.shape}")
    if sar.shape != rgb.shape[:-1]:
        raise ValueError(f"rgb {rgb.shape[:-1]} and sar {sar.shape} sizes differ")
    return rgb, sar


class Segmenter:
    """Open-vocabulary segmentation of RGB + SAR tiles with one MM-OVSeg model.

    overlap, global_view: the sliding window for tiles larger than the model input;
    batch_size: model inputs per call (windows, or tiles in `probabilities_batch`),
    the last chunk padded so that one compiled shape serves every call.
    """

    def __init__(self, model: mmovseg.Model, tokenizer, *, overlap: float = 1 / 3, global_view: bool = True,
                 batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.config: mmovseg.Config = model.config
        self.tokenizer = tokenizer
        self.overlap = overlap
        self.global_view = global_view
        self.batch_size = batch_size
        graphdef, self._state = nnx.split(model)
        self._graph = _Graph(self.config, graphdef)
        self._text_cache: collections.OrderedDict[tuple[str, ...], jax.Array] = collections.OrderedDict()

    @classmethod
    def load(cls, folder: str | os.PathLike, dtype: str | None = None, fp8: bool = False, **kw) -> "Segmenter":
        """Model and tokenizer from a model folder (`convert.to_flax` or training);
        FileNotFoundError / ValueError naming the folder if it is not an MM-OVSeg model.
        dtype: compute dtype (default the model's; bfloat16 with fp8); fp8: the vision
        encoders' block GEMMs in float8 (then `calibrate_fp8` for static scales)."""
        from mmovseg_jax.models import storage
        from mmovseg_jax.models.tokenizer import Tokenizer

        folder = Path(folder)
        if fp8 and dtype not in (None, "bfloat16"):
            raise ValueError(f"float8 products run with bfloat16 compute, not dtype {dtype!r}: "
                             "leave the dtype unset or pass bfloat16")
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such model folder")
        try:
            model = storage.load_model(folder, expect_family="mmovseg", dtype="bfloat16" if fp8 else dtype,
                                       fp8=True if fp8 else None)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{folder}: not an MM-OVSeg model folder ({_one_line(e)})") from e
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{folder}: not a usable MM-OVSeg model folder ({_one_line(e)})") from e
        tokenizer = Tokenizer(folder, context_length=model.config.clip.text.context_length)
        return cls(model, tokenizer, **kw)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def fp8(self) -> str:
        """ "off" (no float8 layers), "on" (current scaling) or "static" (calibrated and frozen)."""
        found = fp8_inference.float8_layers(self.model)
        if not found:
            return "off"
        return "static" if any(m.frozen for m in found.values()) else "on"

    def calibrate_fp8(self, tiles: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> dict[str, int]:
        """Static float8 scales from representative tiles, then frozen (fp8_inference.prepare).

        tiles: (rgb (H, W, 3), sar (H, W) or None) pairs of any sizes, as `probabilities`
        takes them (any iterable: they are read one at a time); calibration runs the very
        inputs prediction would (the resized tile, or the sliding windows and the global
        view), batch_size at a time, in bf16 products. Inputs beyond the ranges seen
        saturate later, so pass tiles like those to be segmented. With several processes,
        every process calls it (ranges are maxed over all). Returns {"tiles", "batches",
        "layers", "frozen"}. ValueError for a model without float8 layers (load with
        fp8=True), one already frozen, no tiles, or a bad pair (the model then stays as it
        was: ranges are set only once every tile has run)."""
        if self.fp8 == "off":
            raise ValueError("the model has no float8 layers to calibrate: Segmenter.load(folder, fp8=True), "
                             "or a model built with fp8=True")
        if self.fp8 == "static":
            raise ValueError("the model's float8 layers are calibrated and frozen already")
        size, count = self.image_size, 0

        def forward(model, rgb, sar):
            return model.encode_images(_to_model_input(rgb, size),
                                       None if sar is None else _to_model_input(preprocess.sar_as_rgb(sar), size))

        def inputs():  # (rgb, sar or None) model inputs of one tile after another
            nonlocal count
            for rgb, sar in tiles:
                rgb, sar = _check_pair(rgb, sar, self.config.use_sar, batched=False)
                yield self._model_inputs(rgb, sar)
                count += 1
            if count == 0:
                raise ValueError("calibrate_fp8 needs at least one tile")

        counts = fp8_inference.prepare(self.model, forward, _full_batches(inputs(), self.batch_size))
        summary = {"tiles": count, **counts}
        graphdef, self._state = nnx.split(self.model)
        self._graph = _Graph(self.config, graphdef)
        self._text_cache.clear()
        return summary

    def _model_inputs(self, rgb: np.ndarray, sar: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The (N, S, S, 3) / (N, S, S) pixel inputs `probabilities` runs for one tile:
        the tile resized to S x S, or its windows and global view."""
        seen_rgb, seen_sar = [], []

        def record(r: np.ndarray, s: np.ndarray) -> np.ndarray:
            seen_rgb.append(np.asarray(r, np.float32))
            seen_sar.append(np.asarray(s, np.float32))
            return np.zeros((len(r), 1, *r.shape[1:3]), np.float32)

        sliding_window_probabilities(record, rgb, np.zeros(rgb.shape[:2], np.float32) if sar is None else sar,
                                     window=self.image_size, overlap=self.overlap, global_view=self.global_view,
                                     batch_size=self.batch_size, pad_batches=False)
        return np.concatenate(seen_rgb), None if sar is None else np.concatenate(seen_sar)

    # -- text ---------------------------------------------------------------------------------

    def text(self, classes: Sequence[str]) -> jax.Array:
        """(T, P, E) embeddings of this class list (P prompt templates), cached per tuple of names.
        ValueError for an empty list, duplicate or empty names."""
        if isinstance(classes, str):
            raise ValueError(f"classes must be a sequence of class names, got the string {classes!r}")
        key = tuple(classes)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        if any(not isinstance(c, str) or not c.strip() for c in key):
            raise ValueError(f"class names must be non-empty strings, got {list(key)!r}")
        tokens = mmovseg.tokenize_classes(self.tokenizer, key, self.config.templates)
        embeddings = _encode_text(self._graph, self._state, jnp.asarray(tokens))
        self._text_cache[key] = embeddings
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return embeddings

    def _text_of(self, classes_or_text) -> jax.Array:
        if isinstance(classes_or_text, (jax.Array, np.ndarray)):
            text = jnp.asarray(classes_or_text, jnp.float32)
            want = (self.config.head.num_prompts, self.config.clip.embed_dim)
            if text.ndim != 3 or text.shape[1:] != want or text.shape[0] < 1:
                raise ValueError(f"text embeddings must be (T, {want[0]}, {want[1]}), got {text.shape}")
            return text
        return self.text(classes_or_text)

    # -- images -------------------------------------------------------------------------------

    def _run(self, rgb: np.ndarray, sar: np.ndarray | None, text: jax.Array,
             out_size: tuple[int, int]) -> np.ndarray:
        """One jitted call: rgb (N, H, W, 3), sar (N, H, W) -> (N, T, *out_size) float32."""
        out = _forward(self._graph, self._state, jnp.asarray(rgb), None if sar is None else jnp.asarray(sar),
                       text, out_size=tuple(out_size))
        return np.asarray(jax.device_get(out), np.float32)

    def _run_padded(self, rgb: np.ndarray, sar: np.ndarray | None, text: jax.Array,
                    out_size: tuple[int, int]) -> np.ndarray:
        """`_run` over chunks of batch_size; the last chunk padded by repeating its last input."""
        outputs = []
        for start in range(0, len(rgb), self.batch_size):
            r = rgb[start:start + self.batch_size]
            s = None if sar is None else sar[start:start + self.batch_size]
            n, pad = len(r), self.batch_size - len(r)
            if pad:
                r = np.concatenate([r, np.repeat(r[-1:], pad, axis=0)])
                s = None if s is None else np.concatenate([s, np.repeat(s[-1:], pad, axis=0)])
            outputs.append(self._run(r, s, text, out_size)[:n])
        return np.concatenate(outputs)

    def windows(self, height: int, width: int) -> int:
        """Model inputs a (height, width) tile takes (1 unless it is larger than the model input)."""
        return window_count(height, width, self.image_size, self.overlap, self.global_view)

    def probabilities(self, rgb: np.ndarray, sar: np.ndarray | None, classes_or_text) -> np.ndarray:
        """One tile: rgb (H, W, 3), sar (H, W) or (H, W, 1) uint8 (None without a SAR branch);
        classes_or_text: class names or (T, P, E) embeddings -> (T, H, W) float32 probabilities."""
        rgb, sar = _check_pair(rgb, sar, self.config.use_sar, batched=False)
        text = self._text_of(classes_or_text)
        height, width = rgb.shape[:2]
        size = self.image_size
        if height <= size and width <= size:
            return self._run(rgb[None], None if sar is None else sar[None], text, (height, width))[0]
        with_sar = sar is not None

        def predict_fn(r: np.ndarray, s: np.ndarray) -> np.ndarray:
            return self._run(r, s if with_sar else None, text, (size, size))

        return sliding_window_probabilities(
            predict_fn, rgb, sar if with_sar else np.zeros(rgb.shape[:2], np.float32), window=size,
            overlap=self.overlap, global_view=self.global_view, batch_size=self.batch_size, pad_batches=True)

    def probabilities_batch(self, rgb: np.ndarray, sar: np.ndarray | None, classes_or_text) -> np.ndarray:
        """Same-size tiles: rgb (N, H, W, 3), sar (N, H, W) -> (N, T, H, W) float32.
        Tiles no larger than the model input run batch_size at a time (padded to one
        compiled shape); larger ones each through the sliding window."""
        rgb, sar = _check_pair(rgb, sar, self.config.use_sar, batched=True)
        text = self._text_of(classes_or_text)
        height, width = rgb.shape[1:3]
        if height <= self.image_size and width <= self.image_size:
            return self._run_padded(rgb, sar, text, (height, width))
        return np.stack([self.probabilities(rgb[i], None if sar is None else sar[i], text)
                         for i in range(len(rgb))])

    def predict(self, rgb: np.ndarray, sar: np.ndarray | None, classes: Sequence[str]) -> np.ndarray:
        """(H, W) uint8 index of the most probable class of `classes` (at most 256 classes)."""
        probs = self.probabilities(rgb, sar, classes)
        return argmax_index(probs)


def argmax_index(probs: np.ndarray) -> np.ndarray:
    """(T, H, W) probabilities -> (H, W) uint8 argmax over T (T <= 256)."""
    if probs.shape[0] > 256:
        raise ValueError(f"{probs.shape[0]} classes do not fit a uint8 index map (at most 256)")
    return np.argmax(probs, axis=0).astype(np.uint8)


def _one_line(e: BaseException, listed: int = 6) -> str:
    """The message on one line, each `missing N: a, b, ...` / `unexpected N: ...` list of
    parameter names cut to its first `listed` names."""
    import re

    def cut(m: re.Match) -> str:
        names = m.group(2).strip().split(", ")
        more = f", ... ({len(names) - listed} more)" if len(names) > listed else ""
        return m.group(1) + ", ".join(names[:listed]) + more + " "

    text = " ".join(str(e).split("\n")).strip() or type(e).__name__
    return re.sub(r"((?:missing|unexpected) \d+: )([^|]+?)\s*(?=\||$)", cut, text).strip()
