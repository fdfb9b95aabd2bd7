"""Synthetic RGB+SAR scenes: shapes, determinism, class coverage and the physics of the rendering."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mmovseg_jax.data.synthetic import (CITY, CLASSES, FOREST, SAR_LOOKS, WATER, BARE, SyntheticPairs,
                                        generate_scene, record_seed, sar_uint8_to_intensity)

from conftest import erode


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    return [generate_scene(s) for s in range(24)]


def test_shapes_and_dtypes():
    for size in (96, 128):
        scene = generate_scene(7, size)
        assert set(scene) == {"rgb", "sar", "label"}
        assert scene["rgb"].shape == (size, size, 3) and scene["rgb"].dtype == np.uint8
        assert scene["sar"].shape == (size, size) and scene["sar"].dtype == np.uint8
        assert scene["label"].shape == (size, size) and scene["label"].dtype == np.uint8
        assert scene["label"].max() < len(CLASSES)
    assert CLASSES == ("water", "forest", "city", "road", "farmland", "bare soil")


def test_deterministic_per_seed():
    a, b, c = generate_scene(3), generate_scene(3), generate_scene(4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["rgb"], c["rgb"])
    assert not np.array_equal(a["sar"], c["sar"])
    assert not np.array_equal(a["label"], c["label"])


def test_every_class_appears_in_a_few_scenes(scenes):
    present = np.zeros(len(CLASSES), int)
    for scene in scenes[:8]:
        present += np.bincount(scene["label"].ravel(), minlength=len(CLASSES)) > 0
    print("scenes (of 8) containing each class:", dict(zip(CLASSES, present.tolist())))
    assert (present > 0).all()


def test_scenes_vary(scenes):
    shares = np.stack([np.bincount(s["label"].ravel(), minlength=len(CLASSES)) / s["label"].size for s in scenes])
    assert shares.std(axis=0).min() > 0.03, shares.std(axis=0)  # class proportions vary per scene
    means = np.stack([s["rgb"].reshape(-1, 3).mean(0) for s in scenes])
    assert means.std(axis=0).min() > 3  # overall colour varies per scene


def test_sar_backscatter_order_and_optical_brightness(scenes):
    sar = {c: [] for c in (WATER, FOREST, CITY)}
    rgb = {c: [] for c in (WATER, BARE)}
    for s in scenes:
        for c in sar:
            sar[c].append(s["sar"][s["label"] == c])
        for c in rgb:
            rgb[c].append(s["rgb"][s["label"] == c].astype(np.float64).mean(-1))
    m = {c: np.concatenate(v).mean() for c, v in sar.items()}
    o = {c: np.concatenate(v).mean() for c, v in rgb.items()}
    print(f"SAR mean (uint8): water {m[WATER]:.1f} forest {m[FOREST]:.1f} city {m[CITY]:.1f}; "
          f"optical mean: water {o[WATER]:.1f} bare soil {o[BARE]:.1f}")
    assert m[WATER] + 20 < m[FOREST] < m[CITY]
    assert o[WATER] + 40 < o[BARE]


def test_water_speckle_statistics(scenes):
    """Homogeneous water: intensity coefficient of variation ~ 1/sqrt(looks) (fully developed speckle)."""
    cvs = []
    for s in scenes:
        core = erode(s["label"] == WATER, 3)
        if core.sum() >= 300:
            intensity = sar_uint8_to_intensity(s["sar"][core])
            cvs.append(intensity.std() / intensity.mean())
    assert len(cvs) >= 5
    expected = 1 / np.sqrt(SAR_LOOKS)
    print(f"water intensity CV: median {np.median(cvs):.3f} over {len(cvs)} scenes (expected {expected:.3f})")
    assert abs(np.median(cvs) - expected) < 0.1 * expected
    assert all(abs(cv - expected) < 0.25 * expected for cv in cvs)


def test_synthetic_pairs_source():
    train, held_out = SyntheticPairs(16, size=64, seed=0), SyntheticPairs(16, size=64, seed=1)
    assert len(train) == 16
    rec = train[5]
    assert rec["index"] == 5 and rec["index"].dtype == np.int64
    assert rec["rgb"].shape == (64, 64, 3)
    np.testing.assert_array_equal(rec["sar"], train[5]["sar"])
    np.testing.assert_array_equal(rec["rgb"], generate_scene(record_seed(0, 5), 64)["rgb"])
    train_seeds = {record_seed(0, i) for i in range(1000)}
    held_seeds = {record_seed(1, i) for i in range(1000)}
    assert len(train_seeds) == 1000 and not train_seeds & held_seeds
    assert not np.array_equal(train[3]["rgb"], held_out[3]["rgb"])
    with pytest.raises(IndexError):
        train[16]


def test_generation_speed_is_reported():
    for size, count in ((96, 40), (256, 5)):
        generate_scene(0, size)
        start = time.perf_counter()
        for s in range(count):
            generate_scene(s, size)
        print(f"generate_scene({size}): {(time.perf_counter() - start) / count * 1e3:.2f} ms/scene")
