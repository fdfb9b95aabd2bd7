"""Labelled optical + SAR readers for the DEF segmentation stage (Grain random-access sources).

Every reader returns the canonical record of `layouts` with a label:

    rgb   uint8 (H, W, 3)
    sar   uint8 (H, W)
    valid bool  (H, W)
    label uint8 (H, W)   values 0..len(classes)-1 name `classes[v]`; 255 = ignore
    index np.int64

Each reader exposes `classes`, the class name of every label value. Raw label values
are mapped through a lookup table (identity for the authors' prepared copies); a raw
value that is neither a class id nor 255, or that the map does not list, raises
ValueError naming the label file and the offending values. RGB, SAR and label files of
different sizes raise ValueError naming the files (`layouts.check_same_size`).
With `skip_bad_samples=True` such a sample is replaced by the next readable one and
counted in `reader.skipped` (`layouts` module docstring).
Readers hold only paths and settings, so they pickle into Grain worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, SupportsIndex

import numpy as np

from mmovseg_jax.data.imageio import PathLike
from mmovseg_jax.data.layouts import PairedFolder, Record, Sample, _listing, _normalise_index

IGNORE_LABEL = 255

# Release class strings (the authors' class JSON files), in the label order of each dataset.
PIE_CLASSES = ("backbroad", "city", "road", "water", "forest", "farmland")
DDSK_CLASSES = ("city", "road", "forest", "water", "farmland")
DDCH_CLASSES = ("city", "road", "farmland", "forest", "water")
OEM_CLASSES = ("bareland", "rangeland", "developedspace", "road", "tree", "water", "agricultureland", "building")


# ---- label lookup tables ------------------------------------------------------------------------------------


def label_lut(num_classes: int, label_map: Mapping[int, int] | None = None) -> np.ndarray:
    """(256,) int16 table raw value -> label value; -1 marks values that are an error.

    Without `label_map`: 0..num_classes-1 and 255 map to themselves. With it: exactly
    its keys are allowed (each to a value < num_classes or 255), plus 255 -> 255 unless
    the map says otherwise.
    """
    if not 0 < num_classes < IGNORE_LABEL:
        raise ValueError(f"num_classes must be 1..254, got {num_classes}")
    lut = np.full(256, -1, np.int16)
    lut[IGNORE_LABEL] = IGNORE_LABEL
    if label_map is None:
        lut[:num_classes] = np.arange(num_classes)
        return lut
    for raw, value in label_map.items():
        if not 0 <= raw <= 255 or not (0 <= value < num_classes or value == IGNORE_LABEL):
            raise ValueError(f"label_map entry {raw} -> {value}: raw must be 0..255 and the value a class id "
                             f"below {num_classes} or {IGNORE_LABEL}")
        lut[raw] = value
    return lut


def apply_label_lut(label: np.ndarray, lut: np.ndarray, path: PathLike, classes: Sequence[str]) -> np.ndarray:
    """(H, W) uint8 raw label -> (H, W) uint8 label; ValueError naming `path` and bad raw values."""
    mapped = lut[label]
    if (mapped < 0).any():
        bad = np.unique(label[mapped < 0]).tolist()
        allowed = np.flatnonzero(lut >= 0).tolist()
        raise ValueError(f"{path}: label values {bad} are not allowed (allowed raw values {allowed}; "
                         f"classes {', '.join(classes)}; {IGNORE_LABEL} = ignore)")
    return mapped.astype(np.uint8)


def check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """The class names as a tuple; ValueError for an empty list, empty or duplicate names."""
    if isinstance(classes, str):
        raise ValueError(f"classes must be a sequence of names, got the string {classes!r}")
    names = tuple(classes)
    if not any(isinstance(c, str) and c.strip() for c in names):
        raise ValueError("the class list is empty")
    if any(not isinstance(c, str) or not c.strip() for c in names):
        raise ValueError(f"empty class name in {list(names)!r}")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate class names: {', '.join(dupes)}")
    return names


def _require_folders(root: Path, *dirs: str) -> None:
    missing = [str(root / d) for d in dirs if not (root / d).is_dir()]
    if missing:
        raise ValueError(f"missing folder(s): {', '.join(missing)}")


# ---- readers ------------------------------------------------------------------------------------------------


class LabelledFolder(PairedFolder):
    """`PairedFolder` with a class list and checked (optionally remapped) labels.

    Layout `root/{rgb_dir,sar_dir,label_dir}/<name>.<ext>` (same stem, extensions may
    differ). `label_map` maps raw file values to label values (see `label_lut`).
    A missing folder raises ValueError naming it; an empty or duplicate class list too.
    skip_bad_samples: replace unreadable samples (bad label values included) by the
    next readable one, counted in `skipped`, instead of raising.
    """

    def __init__(self, root: PathLike, rgb_dir: str, sar_dir: str, label_dir: str, classes: Sequence[str], *,
                 label_map: Mapping[int, int] | None = None, skip_unpaired: bool = False,
                 skip_bad_samples: bool = False, **sar_options: Any):
        _require_folders(Path(root), rgb_dir, sar_dir, label_dir)
        self.classes = check_classes(classes)
        self.lut = label_lut(len(self.classes), label_map)
        super().__init__(root, rgb_dir, sar_dir, label_dir, skip_unpaired=skip_unpaired,
                         skip_bad_samples=skip_bad_samples, **sar_options)

    def _load(self, sample: Sample) -> Record:
        record = super()._load(sample)
        record["label"] = apply_label_lut(record["label"], self.lut, sample.label, self.classes)
        return record

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} samples, {len(self.classes)} classes)"


class PreparedFolder(LabelledFolder):
    """The authors' prepared copies: `root/split/{rgb_dir,sar_dir,label_dir}/<name>.<ext>`.

    root is the dataset folder (e.g. `.../PIE_RGBSAR`, `DDSK`, `DDCH`, `OEM`); the SAR file
    has the optical file's stem (DDCH: .jpg optical and SAR); labels are PNG single-channel
    values 0..len(classes)-1, 255 = ignore, used as is (no remap).
    """

    def __init__(self, root: PathLike, split: str, rgb_dir: str, sar_dir: str, label_dir: str,
                 classes: Sequence[str], *, skip_unpaired: bool = False, skip_bad_samples: bool = False):
        self.split = split
        super().__init__(Path(root) / split, rgb_dir, sar_dir, label_dir, classes, skip_unpaired=skip_unpaired,
                         skip_bad_samples=skip_bad_samples)


class OpenEarthMapSAR(LabelledFolder):
    """OpenEarthMap-SAR (DFC2025 track 1): `root/split/{rgb_images,sar_images,labels}/<name>.tif`.

    Raw labels 0 unlabeled, 1 bareland, 2 rangeland, 3 developed space, 4 road, 5 tree,
    6 water, 7 agriculture land, 8 building are remapped 0 -> 255 and v -> v - 1, which is
    exactly the prepared OEM test order; `classes` uses the release spellings (OEM_CLASSES).
    """

    LABEL_MAP = {0: IGNORE_LABEL, **{v: v - 1 for v in range(1, 9)}}

    def __init__(self, root: PathLike, split: str = "train", *, skip_unpaired: bool = False,
                 skip_bad_samples: bool = False):
        self.split = split
        super().__init__(Path(root) / split, "rgb_images", "sar_images", "labels", OEM_CLASSES,
                         label_map=self.LABEL_MAP, skip_unpaired=skip_unpaired, skip_bad_samples=skip_bad_samples)


class PieRgbSar(LabelledFolder):
    """PIE-RGB-SAR (ASANet release): `root/{rgb,sar,label}/<name>.tif` and `root/<split>.txt`.

    The split file lists one sample name per line (with or without extension). Labels
    0 background, 1 city, 2 road, 3 water, 4 forest, 5 farmland are already the prepared
    PIE test order (no remap); `classes` uses the release spelling "backbroad".
    SAR that is not uint8 is mapped as dB by `imageio.sar_to_uint8` (`sar_options`).
    """

    def __init__(self, root: PathLike, split: str = "train", *, skip_unpaired: bool = False,
                 skip_bad_samples: bool = False, **sar_options: Any):
        self.split = split
        list_file = Path(root) / f"{split}.txt"
        if not list_file.is_file():
            raise ValueError(f"{list_file}: split list not found")
        super().__init__(root, "rgb", "sar", "label", PIE_CLASSES, skip_unpaired=skip_unpaired,
                         skip_bad_samples=skip_bad_samples, **sar_options)
        names = [_strip_ext(line.strip()) for line in list_file.read_text().splitlines() if line.strip()]
        by_key = {s.key: s for s in self.samples}
        missing = [n for n in names if n not in by_key]
        if missing:
            raise ValueError(f"{list_file}: {len(missing)} listed sample(s) without rgb/sar/label files: "
                             f"{_listing(missing)}")
        if not names:
            raise ValueError(f"{list_file}: empty split list")
        self.samples = [by_key[n] for n in sorted(set(names))]


class DDHR(LabelledFolder):
    """DDHR (GF-2 optical + GF-3 SAR): `root/region/subdir/{GF2,GF3,label}/<n>.{jpg,jpg,png}`.

    Public copies of DDHR disagree on the label order, and the release only documents
    its prepared copies, so by default labels are read as values 0..4 in the prepared
    DDSK order (DDSK_CLASSES). For a copy with another order pass `classes` and/or a
    `label_map` raw -> index into `classes` (e.g. {0: 255, 1: 0, ...}).
    """

    def __init__(self, root: PathLike, region: str = "korea", subdir: str = "256_cloud", *,
                 classes: Sequence[str] = DDSK_CLASSES, label_map: Mapping[int, int] | None = None,
                 skip_unpaired: bool = False, skip_bad_samples: bool = False):
        self.region = region
        super().__init__(Path(root) / region / subdir, "GF2", "GF3", "label", classes, label_map=label_map,
                         skip_unpaired=skip_unpaired, skip_bad_samples=skip_bad_samples)


class Relabelled:
    """Random-access source whose labels go through `lut` (from `label_lut`); `classes` names them.

    E.g. turns full test labels into seen-class training labels (unseen -> 255) with
    `Setting.test_to_train_lut()`. Records without `valid` get an all-True one.
    """

    keys = ("rgb", "sar", "valid", "label")

    def __init__(self, base: Any, lut: np.ndarray, classes: Sequence[str]):
        self.base, self.lut, self.classes = base, np.asarray(lut, np.int16), tuple(classes)
        if self.lut.shape != (256,):
            raise ValueError(f"lut must have shape (256,), got {self.lut.shape}")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = _normalise_index(index, len(self))
        record = dict(self.base[i])
        where = f"{type(self.base).__name__} record {i}"
        record["label"] = apply_label_lut(np.asarray(record["label"]), self.lut, where, self.classes)
        if "valid" not in record:
            record["valid"] = np.ones(record["label"].shape, bool)
        record["index"] = np.int64(i)
        return record

    def __repr__(self) -> str:
        return f"Relabelled({self.base!r}, {len(self.classes)} classes)"


def _strip_ext(name: str) -> str:
    path = Path(name)
    return path.stem if path.suffix.lower() in (".tif", ".tiff", ".png", ".jpg", ".jpeg") else path.name
