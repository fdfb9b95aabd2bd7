"""Evaluation: confusion-matrix scores, reports, PyTorch-matching bilinear resize and
sliding-window inference with RGB and SAR windowed identically."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmovseg_jax.evaluation.metrics import (ConfusionAccumulator, confusion_matrix, confusion_matrix_jax,
                                            format_table, harmonic_mean, segmentation_scores, write_report)
from mmovseg_jax.ops.resize import bilinear_matrix, resize_bilinear
from mmovseg_jax.evaluation.sliding_window import (axis_origins, sliding_window_probabilities, window_origins,
                                                   window_stride)

NAMES = ["road", "water", "tree", "city"]

# label / prediction pairs, 255 = ignore, 7 = a label value outside [0, K) (not counted).
# class 3 (city) never occurs in the ground truth but is predicted twice;
# class 2 (tree) occurs in the ground truth but is never predicted.
LABEL = np.array([[0, 0, 0, 1, 1, 2],
                  [2, 2, 255, 255, 7, 1]])
PRED = np.array([[0, 0, 1, 1, 3, 0],
                 [3, 0, 2, 3, 0, 1]])
# rows = ground truth, columns = prediction, counted by hand (ignore / 7 columns dropped)
EXPECTED = np.array([[2, 1, 0, 0],
                     [0, 2, 0, 1],
                     [2, 0, 0, 1],
                     [0, 0, 0, 0]])


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(PRED, LABEL, 4)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, EXPECTED)
    with pytest.raises(ValueError):
        confusion_matrix(np.full_like(LABEL, 4), LABEL, 4)


def test_confusion_matrix_jax_matches_numpy():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 6, (3, 17, 23))
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, 5, label.shape)
    want = confusion_matrix(pred, label, 5)
    got = jax.jit(confusion_matrix_jax, static_argnums=(2, 3))(jnp.asarray(pred), jnp.asarray(label), 5, 255)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(confusion_matrix_jax(PRED, LABEL, 4)), EXPECTED)

    acc = ConfusionAccumulator(5)
    acc.add(pred[:2], label[:2])
    acc.add_matrix(confusion_matrix_jax(jnp.asarray(pred[2:]), jnp.asarray(label[2:]), 5))
    assert acc.matrix.dtype == np.int64
    np.testing.assert_array_equal(acc.matrix, want)


def test_scores_by_hand():
    scores = segmentation_scores(EXPECTED, NAMES, seen=["road", "tree"])
    rows = {r["name"]: r for r in scores["per_class"]}
    # IoU = tp / (gt + pred - tp): road 2/(3+4-2), water 2/(3+3-2), tree 0/(3+0-0)
    assert rows["road"]["IoU"] == pytest.approx(40.0)
    assert rows["water"]["IoU"] == pytest.approx(50.0)
    assert rows["tree"]["IoU"] == 0.0 and rows["tree"]["pred_pixels"] == 0
    # no ground truth: undefined although predicted twice, and left out of every mean
    assert rows["city"]["IoU"] is None and rows["city"]["ACC"] is None and rows["city"]["pred_pixels"] == 2
    assert scores["mIoU"] == pytest.approx(30.0)
    assert scores["mIoU_seen"] == pytest.approx(20.0)  # road, tree
    assert scores["mIoU_unseen"] == pytest.approx(50.0)  # water (city has no gt)
    assert scores["hIoU"] == pytest.approx(2 * 20 * 50 / 70)
    assert scores["pACC"] == pytest.approx(100 * 4 / 9)
    assert scores["mACC"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)
    assert scores["fwIoU"] == pytest.approx((40 + 50 + 0) / 3)
    assert scores["num_pixels"] == 9 and scores["unseen_classes"] == ["water", "city"]
    assert segmentation_scores(EXPECTED, NAMES, seen=[0, 2]) == scores


def test_score_edge_cases():
    assert harmonic_mean(0.0, 0.5) == 0.0 and harmonic_mean(None, 0.5) is None
    all_seen = segmentation_scores(EXPECTED, NAMES, seen=NAMES)
    assert all_seen["mIoU_unseen"] is None and all_seen["hIoU"] is None
    # only the class without ground truth is unseen -> the unseen group is empty too
    assert segmentation_scores(EXPECTED, NAMES, seen=NAMES[:3])["hIoU"] is None
    empty = segmentation_scores(np.zeros((4, 4), int), NAMES, seen=["road"])
    assert empty["mIoU"] is None and empty["pACC"] is None
    with pytest.raises(ValueError):
        segmentation_scores(EXPECTED, NAMES, seen=["background"])


def test_report_files_round_trip(tmp_path):
    scores = segmentation_scores(EXPECTED, NAMES, seen=["road", "tree"])
    write_report(scores, tmp_path / "out" / "scores.json", tmp_path / "out" / "scores.md")
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == scores
    md = (tmp_path / "out" / "scores.md").read_text()
    assert "| water | **unseen** | 50.00 |" in md and "| city | **unseen** | - |" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.json", "scores.md"]  # no temp left
    table = format_table(scores)
    assert "mIoU 30.00" in table and "hIoU 28.57" in table


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size_in,size_out", [((7, 5), (16, 11)), ((37, 29), (8, 13)), ((24, 24), (384, 10))])
def test_resize_matches_torch(size_in, size_out, align_corners):
    x = np.random.default_rng(1).normal(size=(2, *size_in, 3)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out, mode="bilinear",
                         align_corners=align_corners).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(resize_bilinear(x, size_out, align_corners), want, atol=1e-5)
    jitted = jax.jit(lambda a: resize_bilinear(a, size_out, align_corners))
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(x))), want, atol=1e-5)
    np.testing.assert_allclose(bilinear_matrix(size_in[0], size_out[0], align_corners).sum(1), 1.0, atol=1e-6)


def test_resize_channels_first_and_bf16():
    x = np.random.default_rng(2).normal(size=(3, 10, 12)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x)[None], size=(20, 5), mode="bilinear")[0].numpy()
    np.testing.assert_allclose(resize_bilinear(x, (20, 5), axes=(-2, -1)), want, atol=1e-5)
    y = resize_bilinear(jnp.asarray(x, jnp.bfloat16), (20, 5), axes=(1, 2))
    assert y.dtype == jnp.bfloat16 and y.shape == (3, 20, 5)


@pytest.mark.parametrize("size", [1024, 1000, 700, 384, 385, 767])
def test_axis_origins_cover_flush(size):
    stride = window_stride(384, 1 / 3)
    assert stride == 256 and window_stride(384, 0.333) == 256
    starts = axis_origins(size, 384, stride)
    covered = np.zeros(size, bool)
    for s in starts:
        assert 0 <= s and s + 384 <= max(size, 384)
        covered[s:s + 384] = True
    assert covered.all() and starts[-1] == max(size - 384, 0)
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    assert axis_origins(1024, 384, 256) == [0, 256, 512, 640]


def _tile(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (height, width, 3)).astype(np.uint8),
            rng.integers(0, 256, (height, width)).astype(np.uint8))


def _pixel_fn(rgb, sar):
    """(N, w, w, 3), (N, w, w) -> (N, 3, w, w): per-pixel functions of both inputs, so a
    SAR window cropped elsewhere than its RGB window changes the output."""
    r = rgb.mean(-1) / 255.0
    s = sar / 255.0
    return np.stack([r * s, r - s, np.sin(3 * r + 5 * s)], axis=1)


@pytest.mark.parametrize("height,width", [(1000, 700), (1024, 1024), (385, 900)])
def test_windows_reconstruct_pixel_function(height, width):
    rgb, sar = _tile(height, width)
    calls = []

    def predict(r, s):
        calls.append(r.shape)
        return _pixel_fn(r, s)

    got = sliding_window_probabilities(predict, rgb, sar, window=384, global_view=False, batch_size=4)
    want = _pixel_fn(rgb[None].astype(np.float32), sar[None].astype(np.float32))[0]
    assert got.shape == (3, height, width) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert all(shape == (4, 384, 384, 3) for shape in calls)  # padded to one batch shape
    n = len(window_origins(height, width, 384, 1 / 3))
    assert len(calls) == math.ceil(n / 4)


def test_sar_windows_are_the_rgb_crops():
    height, width = 1000, 700
    rgb, sar = _tile(height, width, seed=3)
    # encode each pixel's position in both inputs: a window's SAR must hold its RGB's pixels
    yy, xx = np.mgrid[:height, :width]
    rgb[..., 0], rgb[..., 1] = yy % 256, xx % 256
    sar = (yy * width + xx).astype(np.float32)
    seen_pairs = []

    def predict(r, s):
        seen_pairs.extend(zip(r, s))
        return np.zeros((len(r), 1, 384, 384), np.float32)

    sliding_window_probabilities(predict, rgb, sar, global_view=True, batch_size=5, pad_batches=False)
    origins = window_origins(height, width, 384, 1 / 3)
    assert len(seen_pairs) == len(origins) + 1
    for (y, x), (r, s) in zip(origins, seen_pairs):
        np.testing.assert_array_equal(r, rgb[y:y + 384, x:x + 384])
        np.testing.assert_array_equal(s, sar[y:y + 384, x:x + 384])
    r_global, s_global = seen_pairs[-1]  # the global view: both resized the same way
    np.testing.assert_allclose(r_global, resize_bilinear(rgb.astype(np.float32), (384, 384), axes=(0, 1)))
    np.testing.assert_allclose(s_global, resize_bilinear(sar, (384, 384), axes=(0, 1)))


def test_global_view_and_small_tiles():
    rgb, sar = _tile(800, 800, seed=4)
    constant = lambda r, s: np.full((len(r), 2, 384, 384), 0.25, np.float32)  # noqa: E731
    np.testing.assert_allclose(sliding_window_probabilities(constant, rgb, sar), 0.25, atol=1e-6)

    # global view averaged 50/50: windows see +1, the global view -1 -> 0 everywhere
    def sign(r, s):
        out = np.ones((len(r), 1, 384, 384), np.float32)
        out[-1] = -1  # the global view is the last input (batch_size >= #windows + 1)
        return out
    probs = sliding_window_probabilities(sign, rgb, sar, batch_size=64, pad_batches=False)
    np.testing.assert_allclose(probs, 0.0, atol=1e-6)

    # a tile no larger than the window: one prediction of the resized tile, resized back
    small_rgb, small_sar = _tile(256, 200, seed=5)
    calls = []

    def predict(r, s):
        calls.append(len(r))
        return _pixel_fn(r, s)
    got = sliding_window_probabilities(predict, small_rgb, small_sar)
    assert calls == [1] and got.shape == (3, 256, 200)
    up = _pixel_fn(resize_bilinear(small_rgb[None].astype(np.float32), (384, 384)),
                   resize_bilinear(small_sar[None].astype(np.float32), (384, 384), axes=(1, 2)))
    np.testing.assert_allclose(got, resize_bilinear(up[0], (256, 200), axes=(1, 2)), atol=1e-5)


def test_one_side_shorter_than_window():
    rgb, sar = _tile(300, 1000, seed=6)
    got = sliding_window_probabilities(_pixel_fn, rgb, sar, global_view=False)
    size = (384, 1280)  # short side scaled up to the window, aspect kept
    up = sliding_window_probabilities(_pixel_fn, resize_bilinear(rgb.astype(np.float32), size, axes=(0, 1)),
                                      resize_bilinear(sar.astype(np.float32), size, axes=(0, 1)),
                                      global_view=False)
    assert got.shape == (3, 300, 1000)
    np.testing.assert_allclose(got, resize_bilinear(up, (300, 1000), axes=(1, 2)), atol=1e-6)
