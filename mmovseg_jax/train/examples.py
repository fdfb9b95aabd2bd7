"""Example predictions in TensorBoard while the DEF stage trains.

Every `config.image_every` steps (0: never) the current model segments the first
`config.image_tiles` test tiles, and one image goes to TensorBoard under
`examples/prediction`: a row per tile of RGB | SAR | reference labels | prediction, in the
predict CLI's palette (ignore pixels black), each panel at most 256 px on a side.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from mmovseg_jax.data.segmentation import IGNORE_LABEL
from mmovseg_jax.inference import Segmenter
from mmovseg_jax.predict import palette

PANEL = 256  # longest side of each panel, pixels


def _panel(image: np.ndarray, nearest: bool = False) -> np.ndarray:
    h, w = image.shape[:2]
    scale = min(1.0, PANEL / max(h, w))
    if scale == 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def colour_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class indices (IGNORE_LABEL allowed) -> (H, W, 3) uint8 colours, ignore black."""
    table = np.zeros((256, 3), np.uint8)
    table[:num_classes] = palette(num_classes)
    table[IGNORE_LABEL] = 0
    return table[labels]


def example_grid(records: list[dict], predictions: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Rows RGB | SAR | labels | prediction, one per record: (rows * h, 4 * w, 3) uint8."""
    rows = []
    for r, pred in zip(records, predictions):
        sar = r["sar"] if r["sar"].ndim == 2 else r["sar"][..., 0]
        panels = [_panel(r["rgb"]), _panel(np.repeat(sar[..., None], 3, axis=-1)),
                  _panel(colour_labels(r["label"], num_classes), nearest=True),
                  _panel(colour_labels(pred.astype(np.uint8), num_classes), nearest=True)]
        rows.append(np.concatenate(panels, axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]
    return np.concatenate(rows, axis=0)


class ExampleImages:
    """`maybe_write(step, state)` after each log step: the example image when due."""

    def __init__(self, graphdef, frozen, tokenizer, setting, source, config: ml_collections.ConfigDict, reporter):
        self.every = config.image_every if config.tensorboard else 0
        self.graphdef, self.frozen, self.tokenizer, self.reporter = graphdef, frozen, tokenizer, reporter
        self.classes = setting.classes("test")
        self.batch_size = config.eval.batch_size
        count = min(config.image_tiles, len(source)) if self.every else 0
        self.records = [source[i] for i in range(count)]

    def maybe_write(self, step: int, state: dict) -> None:
        if not self.every or not self.records or step % self.every:
            return
        params = multihost_utils.process_allgather(state["params"], tiled=True)  # every process takes part
        if jax.process_index() != 0:
            return
        model = nnx.merge(self.graphdef, params, jax.device_get(self.frozen))
        segmenter = Segmenter(model, self.tokenizer, batch_size=self.batch_size)
        text = segmenter.text(self.classes)
        predictions = [np.argmax(segmenter.probabilities(r["rgb"], r["sar"], text), axis=0) for r in self.records]
        self.reporter.image("examples/prediction", example_grid(self.records, predictions, len(self.classes)), step)
