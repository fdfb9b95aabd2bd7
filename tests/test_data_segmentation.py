"""Labelled readers, benchmark settings and segmentation augmentation on small look-alike files.

Fixtures write the real layouts (PNG/JPEG via PIL, GeoTIFF via tifffile) in tmp_path.
The augmentation test builds records whose SAR and RGB are functions of the label and
checks, after many random resizes/crops/flips, that the functions still hold pixel by
pixel away from region borders, i.e. SAR and RGB moved with the label.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import erode
from PIL import Image

from mmovseg_jax.data import pipeline
from mmovseg_jax.data.benchmarks import SETTINGS, Setting, build_source
from mmovseg_jax.data.seg_augment import (SegmentationAugment, SegmentationResize, resize_nearest,
                                          shortest_edge_size)
from mmovseg_jax.data.segmentation import (DDHR, DDSK_CLASSES, OEM_CLASSES, PIE_CLASSES, LabelledFolder,
                                           OpenEarthMapSAR, PieRgbSar, PreparedFolder, Relabelled, label_lut)

H, W = 24, 32  # not square, so a transposed axis would show


def label_pattern(num_classes: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_classes, (h, w)).astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_sample(folder: Path, name: str, rgb_dir: str, sar_dir: str, label_dir: str, label: np.ndarray,
                 image_ext: str = ".png") -> None:
    """sar = 10 * label (250 where 255), rgb = (sar, 0, 0), label as given (PNG)."""
    sar = np.where(label == 255, 250, label.astype(np.int64) * 10).astype(np.uint8)
    rgb = np.stack([sar, np.zeros_like(sar), np.zeros_like(sar)], axis=-1)
    write_png(folder / rgb_dir / f"{name}{image_ext}", rgb)
    write_png(folder / sar_dir / f"{name}{image_ext}", sar)
    write_png(folder / label_dir / f"{name}.png", label)


def make_setting_root(root: Path, setting: Setting, n: int = 2) -> Path:
    for split in ("train", "test"):
        f = setting.folders(split)
        ext = ".jpg" if f.dataset == "DDCH" else ".png"
        k = len(setting.classes(split))
        for i in range(n):
            label = label_pattern(k, seed=i)
            label[0, :3] = 255
            write_sample(root / f.dataset / f.split, f"tile_{i}", f.rgb_dir, f.sar_dir, f.label_dir, label, ext)
    return root


# ---- settings -----------------------------------------------------------------------------------------------


def test_setting_class_lists():
    pie, ddsk, ch, thick = SETTINGS["pie_cloud"], SETTINGS["ddhr_sk"], SETTINGS["ddhr_sk_to_ch"], SETTINGS["oem_thick"]
    assert pie.test_classes == ("backbroad", "city", "road", "water", "forest", "farmland")
    assert pie.seen == ("backbroad", "city", "forest", "farmland") and pie.unseen == ("road", "water")
    assert ddsk.unseen == ("road", "water") and ch.unseen == ("road", "water")
    assert ch.test_classes == ("city", "road", "farmland", "forest", "water")
    assert thick.unseen == ("road", "water", "building")
    # training value i names train_classes[i]: DDSK train 1 = forest = test value 2; in DDCH test order it is 3.
    np.testing.assert_array_equal(ddsk.train_to_test(), [0, 2, 4])
    np.testing.assert_array_equal(ch.train_to_test(), [0, 3, 2])
    np.testing.assert_array_equal(thick.train_to_test(), [0, 1, 2, 4, 6])
    np.testing.assert_array_equal(pie.train_to_test(), [0, 1, 4, 5])
    lut = pie.test_to_train_lut()
    np.testing.assert_array_equal(lut[[0, 1, 2, 3, 4, 5, 255]], [0, 1, 255, 255, 2, 3, 255])
    np.testing.assert_array_equal(thick.seen_mask(), [1, 1, 1, 0, 1, 0, 1, 0])
    assert SETTINGS["oem_thin"].test.rgb_dir == "rgb_cloud_thin" and SETTINGS["oem_thin"].test.split == "val"
    assert SETTINGS["pie_clean"].train.rgb_dir == "rgb" and SETTINGS["pie_cloud"].train.rgb_dir == "rgb_clouds"
    syn = SETTINGS["synthetic"]
    assert len(syn.seen) == 4 and len(syn.unseen) == 2
    with pytest.raises(ValueError, match="not test classes"):
        Setting("bad", pie.train, pie.test, ("city", "moon"), ("city",))


@pytest.mark.parametrize("name", [n for n in SETTINGS if n != "synthetic"])
def test_each_setting_builds_from_fake_root(tmp_path, name):
    setting = SETTINGS[name]
    root = make_setting_root(tmp_path, setting)
    for split in ("train", "test"):
        source = pickle.loads(pickle.dumps(build_source(setting, split, root)))  # Grain workers pickle it
        assert len(source) == 2 and source.classes == setting.classes(split)
        record = source[1]
        assert record["rgb"].shape == (H, W, 3) and record["rgb"].dtype == np.uint8
        assert record["sar"].shape == (H, W) and record["valid"].shape == (H, W) and record["valid"].all()
        assert record["label"].dtype == np.uint8 and record["index"] == 1
        values = set(np.unique(record["label"]).tolist()) - {255}
        assert values <= set(range(len(setting.classes(split)))) and 255 in record["label"]
        if setting.folders(split).dataset != "DDCH":  # lossless PNG: files read back exactly
            np.testing.assert_array_equal(record["sar"], np.where(record["label"] == 255, 250, record["label"] * 10)
                                          .astype(np.uint8))


def test_build_source_names_missing_folder(tmp_path):
    setting = SETTINGS["ddhr_sk"]
    with pytest.raises(ValueError, match="DDSK"):
        build_source(setting, "train", tmp_path)
    (tmp_path / "DDSK" / "train" / "rgb_clouds").mkdir(parents=True)
    (tmp_path / "DDSK" / "train" / "sar").mkdir()
    with pytest.raises(ValueError, match=r"D2masks3class"):
        build_source(setting, "train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        build_source(setting, "validation", tmp_path)
    with pytest.raises(ValueError, match="unknown setting"):
        build_source("nope", "train", tmp_path)


def test_train_labels_in_test_order_are_rejected(tmp_path):
    """A training folder holding test-order values (e.g. 4 = forest in PIE) fails, naming the file."""
    setting = SETTINGS["pie_cloud"]
    root = make_setting_root(tmp_path, setting)
    bad = tmp_path / "PIE_RGBSAR" / "train" / "D2masks6" / "tile_0.png"
    label = label_pattern(6, seed=0)
    label[0, 0] = 5
    write_png(bad, label)
    with pytest.raises(ValueError, match=r"tile_0\.png: label values \[4, 5\]"):
        build_source(setting, "train", root)[0]


def test_synthetic_setting():
    setting = SETTINGS["synthetic"]
    train, test = build_source(setting, "train", num_records=3, size=32), build_source(setting, "test", size=32)
    from mmovseg_jax.data.synthetic import generate_scene, record_seed

    raw = generate_scene(record_seed(0, 1), 32)["label"]
    expected = setting.test_to_train_lut()[raw]
    np.testing.assert_array_equal(train[1]["label"], expected)
    assert train[1]["valid"].all() and train[1]["sar"].shape == (32, 32)
    assert set(np.unique(test[0]["label"]).tolist()) <= set(range(len(setting.test_classes)))
    assert not np.array_equal(test[0]["rgb"], build_source(setting, "train", size=32)[0]["rgb"])


# ---- readers ------------------------------------------------------------------------------------------------


def test_prepared_folder_jpeg_images_png_labels(tmp_path):
    label = label_pattern(5)
    write_sample(tmp_path / "DDCH" / "val", "a", "rgb_clouds", "sar", "D2masks", label, ".jpg")
    source = PreparedFolder(tmp_path / "DDCH", "val", "rgb_clouds", "sar", "D2masks", DDSK_CLASSES)
    record = source[0]
    np.testing.assert_array_equal(record["label"], label)
    assert record["sar"].shape == (H, W) and record["rgb"].shape == (H, W, 3)


def test_bad_label_values_name_file(tmp_path):
    label = label_pattern(3)
    label[2, 2], label[3, 3] = 7, 9
    write_sample(tmp_path, "x", "rgb", "sar", "lab", label)
    source = LabelledFolder(tmp_path, "rgb", "sar", "lab", ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"lab/x\.png: label values \[7, 9\]"):
        source[0]


def test_size_mismatch_names_files(tmp_path):
    label = label_pattern(3)
    write_sample(tmp_path, "x", "rgb", "sar", "lab", label)
    write_png(tmp_path / "sar" / "x.png", np.zeros((H + 2, W), np.uint8))
    source = LabelledFolder(tmp_path, "rgb", "sar", "lab", ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"sizes differ.*rgb/x\.png.*sar/x\.png.*lab/x\.png"):
        source[0]


def test_labelled_folder_missing_folder(tmp_path):
    (tmp_path / "rgb").mkdir()
    with pytest.raises(ValueError, match=r"missing folder\(s\): .*sar, .*lab"):
        LabelledFolder(tmp_path, "rgb", "sar", "lab", ("a",))


def test_open_earth_map_sar_remap(tmp_path):
    base = tmp_path / "train"
    raw = (np.arange(H * W).reshape(H, W) % 9).astype(np.uint8)  # 0 unlabeled, 1..8 classes
    for sub in ("rgb_images", "sar_images", "labels"):
        (base / sub).mkdir(parents=True)
    tifffile.imwrite(base / "rgb_images" / "aachen_1.tif", np.full((H, W, 3), 7, np.uint8), photometric="rgb")
    tifffile.imwrite(base / "sar_images" / "aachen_1.tif", np.full((H, W), 9, np.uint8))
    tifffile.imwrite(base / "labels" / "aachen_1.tif", raw)
    source = OpenEarthMapSAR(tmp_path, "train")
    record = source[0]
    assert source.classes == OEM_CLASSES == SETTINGS["oem_thick"].test_classes
    np.testing.assert_array_equal(record["label"], np.where(raw == 0, 255, raw - 1))
    assert OEM_CLASSES[record["label"][0, 4]] == "road"  # raw 4 = road
    assert (record["sar"] == 9).all() and (record["rgb"] == 7).all()
    raw[1, 1] = 12
    tifffile.imwrite(base / "labels" / "aachen_1.tif", raw)
    with pytest.raises(ValueError, match=r"labels/aachen_1\.tif: label values \[12\]"):
        source[0]


def test_pie_rgb_sar_split_lists(tmp_path):
    for i, name in enumerate(["p0", "p1", "p2"]):
        label = label_pattern(6, seed=i)
        for sub, array in (("rgb", np.full((H, W, 3), i, np.uint8)), ("sar", np.full((H, W), i, np.uint8)),
                           ("label", label)):
            (tmp_path / sub).mkdir(exist_ok=True)
            tifffile.imwrite(tmp_path / sub / f"{name}.tif", array)
    (tmp_path / "train.txt").write_text("p2.tif\np0\n")
    (tmp_path / "val.txt").write_text("p1\n")
    train, val = PieRgbSar(tmp_path, "train"), PieRgbSar(tmp_path, "val")
    assert [train.name(i) for i in range(len(train))] == ["p0", "p2"] and len(val) == 1
    assert train.classes == PIE_CLASSES == SETTINGS["pie_cloud"].test_classes
    np.testing.assert_array_equal(train[1]["label"], label_pattern(6, seed=2))
    assert (val[0]["sar"] == 1).all()
    (tmp_path / "val.txt").write_text("p1\np9\n")
    with pytest.raises(ValueError, match=r"val\.txt: 1 listed sample.*p9"):
        PieRgbSar(tmp_path, "val")
    with pytest.raises(ValueError, match=r"test\.txt"):
        PieRgbSar(tmp_path, "test")


def test_ddhr_layout_and_label_map(tmp_path):
    base = tmp_path / "korea" / "256_cloud"
    raw = label_pattern(6)  # a copy with 0 = background and 1..5 classes
    write_sample(base, "12", "GF2", "GF3", "label", raw, ".jpg")
    plain = DDHR(tmp_path, skip_unpaired=False, classes=DDSK_CLASSES + ("other",))
    np.testing.assert_array_equal(plain[0]["label"], raw)
    mapped = DDHR(tmp_path, label_map={0: 255, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4})
    assert mapped.classes == DDSK_CLASSES
    np.testing.assert_array_equal(mapped[0]["label"], np.where(raw == 0, 255, raw - 1))
    with pytest.raises(ValueError, match=r"label/12\.png: label values \[5\]"):
        DDHR(tmp_path)[0]


def test_relabelled_and_label_lut():
    lut = label_lut(3, {0: 255, 1: 0, 2: 1, 3: 2})
    assert lut[255] == 255 and lut[4] == -1
    with pytest.raises(ValueError, match="label_map entry"):
        label_lut(3, {1: 3})

    class Base:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"rgb": np.zeros((2, 2, 3), np.uint8), "sar": np.zeros((2, 2), np.uint8),
                    "label": np.array([[0, 1], [3, 4]], np.uint8)}

    with pytest.raises(ValueError, match=r"Base record 0: label values \[4\]"):
        Relabelled(Base(), lut, "abc")[0]


# ---- augmentation -------------------------------------------------------------------------------------------

AUG_H, AUG_W = 60, 76


def structured_label() -> np.ndarray:
    """Stripes of varying width across x, bands across y, an ignore block: no symmetry."""
    yy, xx = np.mgrid[0:AUG_H, 0:AUG_W]
    stripe = np.searchsorted([7, 12, 22, 30, 41, 47, 60], xx, side="right")
    label = ((stripe + 2 * (yy // 13)) % 5).astype(np.uint8)
    label[40:52, 5:20] = 255
    return label


def sar_of(label: np.ndarray) -> np.ndarray:
    return np.where(label == 255, 250, label.astype(np.int64) * 40).astype(np.uint8)


def rgb_of(label: np.ndarray) -> np.ndarray:
    base = np.where(label == 255, 0, label.astype(np.int64) * 40)
    return np.stack([base, base + 10, 200 - base], axis=-1).astype(np.uint8)


def aligned(out: dict) -> bool:
    """True when SAR and RGB equal f(label) (+-2 grey levels) wherever the 3x3 label patch is one class."""
    ok = True
    for c in range(5):
        core = erode(out["label"] == c, 1)
        ok &= bool(np.all(np.abs(out["sar"][core].astype(int) - 40 * c) <= 2))
        ok &= bool(np.all(np.abs(out["rgb"][core].astype(int) - rgb_of(np.full(1, c, np.uint8))) <= 2))
    return ok


def test_augment_keeps_rgb_sar_label_aligned():
    label = structured_label()
    record = {"rgb": rgb_of(label), "sar": sar_of(label), "label": label, "valid": label != 255,
              "index": np.int64(3)}
    aug = SegmentationAugment(crop_size=48, short_edge=(36, 110), jitter_prob=0.0)
    no_flip = SegmentationAugment(crop_size=48, short_edge=(36, 110), jitter_prob=0.0, flip=False)
    flips = padded = 0
    for seed in range(80):
        out = aug.random_map(record, np.random.default_rng(seed))
        same_geometry = no_flip.random_map(record, np.random.default_rng(seed))
        flipped = not np.array_equal(out["label"], same_geometry["label"])
        if flipped:  # the flip is the only difference, and it moved every field
            for key in ("rgb", "sar", "label", "valid"):
                np.testing.assert_array_equal(out[key], same_geometry[key][:, ::-1])
        flips += flipped
        assert out["rgb"].shape == (48, 48, 3) and out["sar"].shape == (48, 48) and out["label"].shape == (48, 48)
        assert out["valid"].dtype == bool and out["index"] == 3
        assert aligned(out), f"seed {seed}: SAR/RGB not aligned with the label"
        assert not out["valid"][out["label"] == 255].any()  # valid follows label (and padding)
        covered = (out["label"] != 255).sum()
        assert covered > 100  # not an all-padding crop
        # the checker has teeth: a SAR left unflipped (the release's defect) is detected
        assert not aligned({**out, "sar": np.ascontiguousarray(out["sar"][:, ::-1])})
        padded += int(out["label"][-1, -1] == 255 and not out["valid"][-1, -1])
    assert 20 < flips < 60 and padded > 0


def test_jitter_changes_rgb_only():
    label = structured_label()
    record = {"rgb": rgb_of(label), "sar": sar_of(label), "label": label, "valid": np.ones(label.shape, bool)}
    changed = 0
    for seed in range(20):
        plain = SegmentationAugment(crop_size=40, short_edge=(40, 80), jitter_prob=0.0).random_map(
            record, np.random.default_rng(seed))
        jittered = SegmentationAugment(crop_size=40, short_edge=(40, 80), jitter_prob=1.0).random_map(
            record, np.random.default_rng(seed))
        for key in ("sar", "label", "valid"):
            np.testing.assert_array_equal(plain[key], jittered[key])
        changed += int(not np.array_equal(plain["rgb"], jittered["rgb"]))
    assert changed >= 18


def test_shortest_edge_and_padding():
    assert shortest_edge_size(256, 512, 384) == (384, 768)
    assert shortest_edge_size(256, 512, 384, max_size=600) == (300, 600)
    label = np.zeros((20, 30), np.uint8)
    record = {"rgb": np.full((20, 30, 3), 9, np.uint8), "sar": np.full((20, 30), 9, np.uint8), "label": label,
              "valid": np.ones((20, 30), bool)}
    out = SegmentationAugment(crop_size=32, short_edge=20, flip=False, jitter_prob=0).random_map(
        record, np.random.default_rng(0))
    inside = np.zeros((32, 32), bool)
    inside[:20, :30] = True  # a 20 x 30 tile at short edge 20 is padded at the bottom and right
    assert (out["label"][~inside] == 255).all() and not out["valid"][~inside].any()
    assert (out["sar"][~inside] == 0).all() and (out["rgb"][~inside] == 0).all()
    assert (out["label"][inside] == 0).all() and (out["rgb"][inside] == 9).all() and out["valid"][inside].all()
    np.testing.assert_array_equal(resize_nearest(np.arange(4)[None], (1, 8)), [[0, 0, 1, 1, 2, 2, 3, 3]])


def test_segmentation_resize_keeps_label_resolution():
    label = structured_label()
    record = {"rgb": rgb_of(label), "sar": sar_of(label), "label": label, "valid": np.ones(label.shape, bool)}
    out = SegmentationResize(32).map(record)
    assert out["rgb"].shape == (32, 32, 3) and out["sar"].shape == (32, 32)
    assert out["label"] is label and out["valid"].shape == label.shape


def test_pipeline_batches_prepared_folder(tmp_path):
    setting = SETTINGS["oem_thin"]
    root = make_setting_root(tmp_path, setting, n=3)
    source = build_source(setting, "train", root)
    it = pipeline.make_iterator(source, global_batch_size=2, seed=0, train=True,
                                augment=SegmentationAugment(crop_size=16, short_edge=(16, 30)),
                                process_index=0, process_count=1)
    batch = next(it)
    assert batch["rgb"].shape == (2, 16, 16, 3) and batch["sar"].shape == (2, 16, 16)
    assert batch["label"].shape == (2, 16, 16) and batch["valid"].shape == (2, 16, 16)
    assert set(np.unique(batch["label"]).tolist()) <= set(range(len(setting.train_classes))) | {255}
    test = build_source(setting, "test", root)
    it = pipeline.make_iterator(test, global_batch_size=2, seed=0, train=False, augment=SegmentationResize(16),
                                num_epochs=1, process_index=0, process_count=1)
    batch = next(it)
    assert batch["rgb"].shape == (2, 16, 16, 3) and batch["label"].shape == (2, H, W)
