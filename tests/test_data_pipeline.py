"""Paired augmentation keeps modalities aligned; the Grain pipeline is deterministic, resumable and sharded."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from mmovseg_jax.data.augment import CenterCrop, PairedAugment
from mmovseg_jax.data.pipeline import iterator_state_from_json, iterator_state_to_json, make_iterator
from mmovseg_jax.data.synthetic import SyntheticPairs, generate_scene

from conftest import erode

BLOCK = 8


def _aligned_record(size: int = 96, seed: int = 0) -> dict:
    """RGB of constant 8x8 blocks; sar = R channel, label = G // 43, B = 255 deep inside blocks."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size // BLOCK, size // BLOCK, 2), dtype=np.uint8)
    rg = np.repeat(np.repeat(blocks, BLOCK, 0), BLOCK, 1)
    pos = np.arange(size) % BLOCK
    deep = ((pos[:, None] >= 2) & (pos[:, None] < BLOCK - 2) & (pos[None] >= 2) & (pos[None] < BLOCK - 2))
    rgb = np.concatenate([rg, (deep * 255).astype(np.uint8)[..., None]], -1)
    return {"rgb": rgb, "sar": rgb[..., 0].copy(), "label": rgb[..., 1] // 43,
            "valid": np.ones((size, size), bool), "index": np.int64(seed)}



def _batches(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ----------------------------------------------------------------------------- augmentation


def test_paired_augment_keeps_modalities_aligned():
    aug = PairedAugment(64)
    record = _aligned_record()
    for seed in range(20):
        out = aug.random_map(record, np.random.default_rng(seed))
        assert out["rgb"].shape == (64, 64, 3) and out["rgb"].dtype == np.uint8
        assert out["sar"].shape == (64, 64) and out["sar"].dtype == np.uint8
        assert out["label"].shape == (64, 64) and out["valid"].dtype == bool
        assert out["index"] == record["index"]
        # Same bilinear weights for every channel: SAR equals the resampled R channel exactly.
        np.testing.assert_array_equal(out["sar"], out["rgb"][..., 0])
        # Where all four bilinear taps lie deep inside one block, the nearest label is that block's.
        deep = out["rgb"][..., 2] == 255
        assert deep.sum() > 200
        np.testing.assert_array_equal(out["label"][deep], out["rgb"][..., 1][deep] // 43)
        # Fill outside the source: ignore label exactly where valid is False.
        np.testing.assert_array_equal(out["label"] == 255, ~out["valid"])
        # Images are 0 where the whole bilinear footprint is outside (2 px inside the invalid area).
        outside = erode(~out["valid"], 2)
        assert (out["rgb"][outside] == 0).all() and (out["sar"][outside] == 0).all()


def test_paired_augment_on_synthetic_scene_is_consistent():
    scene = generate_scene(2)
    scene["sar"] = scene["rgb"][..., 1].copy()
    out = PairedAugment(48, scale=(0.6, 1.6)).random_map(scene, np.random.default_rng(1))
    np.testing.assert_array_equal(out["sar"], out["rgb"][..., 1])


def test_identity_geometry_is_an_exact_crop_and_flips_mirror():
    record = _aligned_record(seed=3)
    crop = PairedAugment(64, scale=(1, 1), max_rotation_deg=0, flip=False, translate=0)
    flip = PairedAugment(64, scale=(1, 1), max_rotation_deg=0, flip=True, translate=0)
    mirrored = 0
    for seed in range(10):
        for aug in (crop, flip):
            out = aug.random_map(record, np.random.default_rng(seed))
            hits = []
            for top in range(33):
                for left in range(33):
                    window = {k: record[k][top:top + 64, left:left + 64] for k in ("rgb", "sar", "label")}
                    for k in ("rgb", "sar", "label"):
                        window[k + "_m"] = window[k][:, ::-1]
                    if all(np.array_equal(out[k], window[k]) for k in ("rgb", "sar", "label")):
                        hits.append("plain")
                    elif all(np.array_equal(out[k], window[k + "_m"]) for k in ("rgb", "sar", "label")):
                        hits.append("mirror")
            assert len(hits) == 1, (seed, hits)
            assert aug is flip or hits == ["plain"]
            mirrored += hits == ["mirror"]
    assert 0 < mirrored < 10


def test_paired_augment_really_transforms():
    record = _aligned_record(seed=5)
    aug = PairedAugment(64)
    center = CenterCrop(64).map(record)
    outs = [aug.random_map(record, np.random.default_rng(s)) for s in range(8)]
    assert all(not np.array_equal(o["rgb"], center["rgb"]) for o in outs)
    assert len({o["rgb"].tobytes() for o in outs}) == len(outs)
    # Same generator state -> same geometry.
    again = aug.random_map(record, np.random.default_rng(0))
    np.testing.assert_array_equal(again["rgb"], outs[0]["rgb"])


def test_center_crop_is_exact_and_pads_small_tiles():
    record = _aligned_record()
    out = CenterCrop(64).map(record)
    for key in ("rgb", "sar", "label", "valid"):
        np.testing.assert_array_equal(out[key], record[key][16:80, 16:80])
    small = CenterCrop(100).map(record)
    assert small["rgb"].shape == (100, 100, 3)
    np.testing.assert_array_equal(small["sar"][2:98, 2:98], record["sar"])
    assert small["label"][0, 0] == 255 and not small["valid"][0, 0] and small["rgb"][0, 0].sum() == 0


def test_augmentation_speed_is_reported():
    scene = generate_scene(0)
    aug, rng = PairedAugment(64), np.random.default_rng(0)
    aug.random_map(scene, rng)
    start = time.perf_counter()
    for _ in range(200):
        aug.random_map(scene, rng)
    print(f"PairedAugment 96->64: {(time.perf_counter() - start) / 200 * 1e3:.3f} ms/record")


# ----------------------------------------------------------------------------- pipeline

SOURCE = SyntheticPairs(24, size=64, seed=11)
TRAIN = dict(global_batch_size=4, train=True, augment=PairedAugment(48), process_index=0, process_count=1)


def test_batch_shapes_and_dtypes():
    batch = next(make_iterator(SOURCE, seed=0, **TRAIN))
    assert batch["rgb"].shape == (4, 48, 48, 3) and batch["rgb"].dtype == np.uint8
    assert batch["sar"].shape == (4, 48, 48) and batch["sar"].dtype == np.uint8
    assert batch["label"].shape == (4, 48, 48) and batch["label"].dtype == np.uint8
    assert batch["index"].shape == (4,) and batch["index"].dtype == np.int64
    ev = next(make_iterator(SOURCE, seed=0, global_batch_size=8, train=False, augment=CenterCrop(32),
                            process_index=0, process_count=1))
    assert ev["rgb"].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(ev["index"], np.arange(8))


def test_order_is_deterministic_per_seed():
    a = _batches(make_iterator(SOURCE, seed=0, **TRAIN), 3)
    b = _batches(make_iterator(SOURCE, seed=0, **TRAIN), 3)
    c = _batches(make_iterator(SOURCE, seed=1, **TRAIN), 3)
    _assert_same(a, b)
    assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))


def test_train_epochs_cover_source_and_reshuffle():
    it = make_iterator(SOURCE, seed=0, **TRAIN)
    epochs = [np.concatenate([next(it)["index"] for _ in range(6)]) for _ in range(2)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(24))
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("steps", [0, 5, 7])
def test_set_state_resumes_exactly(steps):
    it = make_iterator(SOURCE, seed=2, **TRAIN)
    _batches(it, steps)
    state = iterator_state_from_json(iterator_state_to_json(it.get_state()))
    expected = _batches(it, 4)  # crosses the epoch boundary (6 batches/epoch) for steps 5, 7
    resumed = make_iterator(SOURCE, seed=2, **TRAIN)
    resumed.set_state(state)
    _assert_same(_batches(resumed, 4), expected)


@pytest.mark.parametrize("train", [False, True])
def test_processes_see_disjoint_records_covering_an_epoch(train):
    source = SyntheticPairs(16, size=32, seed=3)
    seen = []
    for p in range(2):
        it = make_iterator(source, global_batch_size=4, seed=5, train=train, num_epochs=1,
                           process_index=p, process_count=2)
        idx = np.concatenate([b["index"] for b in it])
        assert len(idx) == 8
        seen.append(idx)
    assert not set(seen[0]) & set(seen[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(16))


def test_sharding_matches_the_global_stream():
    """Process p of 2 gets records p, p + 2, ... of the 1-process stream, identically augmented."""
    single = _batches(make_iterator(SOURCE, seed=6, **TRAIN), 3)
    for p in range(2):
        local = _batches(make_iterator(SOURCE, seed=6, **{**TRAIN, "process_index": p, "process_count": 2}), 3)
        for whole, part in zip(single, local):
            assert part["rgb"].shape[0] == 2
            for key in whole:
                np.testing.assert_array_equal(part[key], whole[key][p::2], err_msg=key)


def test_global_batch_size_must_divide():
    with pytest.raises(ValueError, match="global_batch_size"):
        make_iterator(SOURCE, global_batch_size=5, seed=0, train=True, process_index=0, process_count=2)


def test_json_state_roundtrip_handles_bytes():
    state = {"a": 1, "b": [b"\x00\xff", {"c": np.int64(3)}], "d": "x"}
    back = iterator_state_from_json(iterator_state_to_json(state))
    assert back == {"a": 1, "b": [b"\x00\xff", {"c": 3}], "d": "x"}
    json.loads(iterator_state_to_json(state))


def test_worker_processes_match_inline_and_resume():
    """mp_prefetch with 2 workers: same batches as in-process; its state resumes too."""
    kwargs = dict(seed=4, **TRAIN)
    reference = _batches(make_iterator(SOURCE, worker_count=0, **kwargs), 5)
    it = make_iterator(SOURCE, worker_count=2, **kwargs)
    try:
        head = _batches(it, 2)
        state = iterator_state_to_json(it.get_state())
        tail = _batches(it, 3)
    finally:
        it.close()
    _assert_same(head + tail, reference)
    resumed = make_iterator(SOURCE, worker_count=2, **kwargs)
    try:
        resumed.set_state(iterator_state_from_json(state))
        _assert_same(_batches(resumed, 3), tail)
    finally:
        resumed.close()
