"""Semantic-segmentation scores from a confusion matrix (REFERENCE.md section 2, "Evaluation").

- `confusion_matrix(pred, label, K)`: (K, K) int64 on the host, rows = ground truth,
  columns = prediction. `confusion_matrix_jax`: the same counts as a jit-able JAX function
  (int32, one bincount) for a sharded eval step; `ConfusionAccumulator` sums either kind
  in int64 on the host.
- `segmentation_scores(conf, class_names, seen)`: JSON-serialisable dict of scores.
- `write_report` / `format_table`: JSON + Markdown files (written atomically), console table.

Conventions (those of detectron2's `SemSegEvaluator`, which the release uses through
`evaluator_type="sem_seg"`; ZegFormer-style seen/unseen split on top):

- Pixels whose label is the ignore value (255) or outside [0, K) are not counted at all,
  whatever the prediction there (detectron2 maps 255 to an extra row/column it drops).
- IoU_c = tp / (gt + pred - tp), where gt and pred count non-ignored pixels. IoU_c and
  ACC_c = tp / gt are None for a class with no ground-truth pixels, even if it was
  predicted (detectron2: `iou_valid = (pos_gt > 0) & (union > 0)`); its false positives
  still lower the IoU of the classes those pixels belong to, and the per-class table keeps
  its pixel counts.
- mIoU / mACC average over the classes with ground truth; mIoU_seen / mIoU_unseen over the
  seen / unseen classes with ground truth (None if there are none); hIoU is their harmonic
  mean (0 if either is 0, None if either is None). fwIoU weighs IoU by gt frequency;
  pACC = sum(tp) / sum(gt).
- All scores are percentages (0-100), as detectron2 reports them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


def confusion_matrix(pred, label, num_classes: int, ignore: int = IGNORE_LABEL) -> np.ndarray:
    """(K, K) int64 counts, conf[g, p] = #pixels with label g predicted p.

    pred, label: integer arrays of the same shape (any rank). Pixels with label == ignore or
    outside [0, K) are excluded; a prediction outside [0, K) on a counted pixel is an error.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred {pred.shape} and label {label.shape} differ in shape")
    label = label.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    valid = (label != ignore) & (label >= 0) & (label < num_classes)
    label, pred = label[valid], pred[valid]
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes}), got [{pred.min()}, {pred.max()}]")
    counts = np.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_jax(pred: jax.Array, label: jax.Array, num_classes: int,
                         ignore: int = IGNORE_LABEL) -> jax.Array:
    """The same (K, K) counts as `confusion_matrix`, int32, traceable under `jax.jit`
    (`num_classes` static). Pixels with a prediction outside [0, K) are dropped rather
    than raising. int32 holds the counts of one batch (< 2**31 pixels); sum batches with
    `ConfusionAccumulator.add_matrix`, which keeps int64 on the host."""
    label = label.astype(jnp.int32).ravel()
    pred = pred.astype(jnp.int32).ravel()
    valid = (label != ignore) & (label >= 0) & (label < num_classes) & (pred >= 0) & (pred < num_classes)
    index = jnp.where(valid, label * num_classes + pred, 0)
    counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionAccumulator:
    """Running (K, K) int64 confusion matrix on the host (rows = ground truth)."""

    def __init__(self, num_classes: int, ignore: int = IGNORE_LABEL):
        self.num_classes, self.ignore = num_classes, ignore
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def add(self, pred, label) -> None:
        """Counts a batch of (..., H, W) integer predictions against labels."""
        self.matrix += confusion_matrix(pred, label, self.num_classes, self.ignore)

    def add_matrix(self, conf) -> None:
        """Adds a (K, K) matrix counted elsewhere (e.g. by `confusion_matrix_jax` on device)."""
        conf = np.asarray(jax.device_get(conf)).astype(np.int64)
        if conf.shape != self.matrix.shape:
            raise ValueError(f"expected a {self.matrix.shape} matrix, got {conf.shape}")
        self.matrix += conf

    def reset(self) -> None:
        self.matrix[...] = 0

    def scores(self, class_names: Sequence[str], seen: Iterable[str | int] = ()) -> dict:
        return segmentation_scores(self.matrix, class_names, seen)


def _percent(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else 100.0 * float(x)


def _mean_valid(values: np.ndarray, mask: np.ndarray) -> float | None:
    return float(values[mask].mean()) if mask.any() else None


def _seen_mask(class_names: Sequence[str], seen: Iterable[str | int]) -> np.ndarray:
    mask = np.zeros(len(class_names), bool)
    for item in seen:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= item < len(class_names):
                raise ValueError(f"seen class index {item} outside [0, {len(class_names)})")
            mask[item] = True
        elif item in class_names:
            mask[list(class_names).index(item)] = True
        else:
            raise ValueError(f"seen class {item!r} is not among the test classes {list(class_names)}")
    return mask


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """2ab / (a + b); 0 if either is 0, None if either is None."""
    if a is None or b is None:
        return None
    if a == 0 or b == 0:
        return 0.0
    return 2.0 * a * b / (a + b)


def segmentation_scores(conf, class_names: Sequence[str], seen: Iterable[str | int] = ()) -> dict:
    """Scores of a (K, K) confusion matrix (rows = ground truth, columns = prediction).

    seen: names (or indices) of the classes seen in training; the other test classes are
    unseen. Returns a JSON-serialisable dict: headline percentages (mIoU, mIoU_seen,
    mIoU_unseen, hIoU, fwIoU, mACC, pACC; None when undefined), `per_class` rows, the
    `confusion_matrix` as nested lists and the pixel count. See the module docstring.
    """
    conf = np.asarray(conf, dtype=np.int64)
    k = len(class_names)
    if conf.shape != (k, k):
        raise ValueError(f"confusion matrix {conf.shape} does not match {k} class names")
    seen_mask = _seen_mask(class_names, seen)
    tp = np.diag(conf).astype(np.float64)
    gt = conf.sum(axis=1).astype(np.float64)
    pred = conf.sum(axis=0).astype(np.float64)
    has_gt = gt > 0
    iou = np.full(k, np.nan)
    acc = np.full(k, np.nan)
    iou[has_gt] = tp[has_gt] / (gt + pred - tp)[has_gt]
    acc[has_gt] = tp[has_gt] / gt[has_gt]
    total = gt.sum()
    miou_seen = _mean_valid(iou, has_gt & seen_mask)
    miou_unseen = _mean_valid(iou, has_gt & ~seen_mask)
    per_class = [
        {"index": c, "name": class_names[c], "seen": bool(seen_mask[c]),
         "IoU": _percent(iou[c]), "ACC": _percent(acc[c]),
         "gt_pixels": int(gt[c]), "pred_pixels": int(pred[c]), "tp": int(tp[c])}
        for c in range(k)
    ]
    return {
        "mIoU": _percent(_mean_valid(iou, has_gt)),
        "mIoU_seen": _percent(miou_seen),
        "mIoU_unseen": _percent(miou_unseen),
        "hIoU": _percent(harmonic_mean(miou_seen, miou_unseen)),
        "fwIoU": _percent(float(np.sum(iou[has_gt] * gt[has_gt]) / total) if total else None),
        "mACC": _percent(_mean_valid(acc, has_gt)),
        "pACC": _percent(float(tp.sum() / total) if total else None),
        "num_pixels": int(total),
        "num_classes": k,
        "class_names": list(class_names),
        "seen_classes": [n for n, s in zip(class_names, seen_mask) if s],
        "unseen_classes": [n for n, s in zip(class_names, seen_mask) if not s],
        "per_class": per_class,
        "confusion_matrix": conf.tolist(),
    }


HEADLINE = ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "fwIoU", "mACC", "pACC")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(scores: dict) -> str:
    """Plain-text per-class table plus the headline numbers, for the console."""
    width = max([len("class")] + [len(r["name"]) for r in scores["per_class"]])
    lines = [f"{'class':<{width}}  split   {'IoU':>6}  {'ACC':>6}  {'gt px':>12}  {'pred px':>12}"]
    for r in scores["per_class"]:
        lines.append(f"{r['name']:<{width}}  {'seen  ' if r['seen'] else 'unseen'}  {_fmt(r['IoU']):>6}  "
                     f"{_fmt(r['ACC']):>6}  {r['gt_pixels']:>12}  {r['pred_pixels']:>12}")
    lines.append(" | ".join(f"{key} {_fmt(scores[key])}" for key in HEADLINE))
    return "\n".join(lines)


def format_markdown(scores: dict, title: str = "Segmentation scores") -> str:
    """Markdown report: headline numbers, per-class table (seen/unseen marked), confusion matrix."""
    names = scores["class_names"]
    out = [f"# {title}", "",
           f"{scores['num_pixels']} labelled pixels, {scores['num_classes']} test classes "
           f"({len(scores['seen_classes'])} seen, {len(scores['unseen_classes'])} unseen). "
           "Percentages; '-' = undefined (no ground truth). IoU = tp / (gt + pred - tp); mean "
           "scores average the classes with ground-truth pixels.", "",
           "| " + " | ".join(HEADLINE) + " |", "|" + "---:|" * len(HEADLINE),
           "| " + " | ".join(_fmt(scores[key]) for key in HEADLINE) + " |", "",
           "| class | split | IoU | ACC | gt pixels | pred pixels |", "|---|---|---:|---:|---:|---:|"]
    for r in scores["per_class"]:
        out.append(f"| {r['name']} | {'seen' if r['seen'] else '**unseen**'} | {_fmt(r['IoU'])} | "
                   f"{_fmt(r['ACC'])} | {r['gt_pixels']} | {r['pred_pixels']} |")
    out += ["", "Confusion matrix (rows = ground truth, columns = prediction):", "",
            "| gt \\ pred | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for name, row in zip(names, scores["confusion_matrix"]):
        out.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(out) + "\n"


def _write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_report(scores: dict, path_json: str | Path, path_md: str | Path | None = None,
                 title: str = "Segmentation scores") -> None:
    """Writes `scores` as JSON and, with `path_md`, the Markdown report (each atomically:
    temp file in the same folder, then os.replace)."""
    _write_atomic(path_json, json.dumps(scores, indent=2, allow_nan=False) + "\n")
    if path_md is not None:
        _write_atomic(path_md, format_markdown(scores, title))
