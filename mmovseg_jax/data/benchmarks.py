"""The paper's open-vocabulary settings as data: folders, class lists and label conventions.

Class strings are the release's verbatim spellings (its class JSON files, e.g.
"backbroad", "developedspace"), which are also the texts the CLIP prompt sees.

Label conventions (derived from the release, see `Setting`):

- Test labels (`D2masks6`, `D2masks`): value i means `test_classes[i]`, 255 = ignore.
- Training labels (`D2masks6` for PIE, `D2masks3class` for DDSK, `D2masks5class` for
  OEM): value i means `train_classes[i]` (the index into the TRAINING class list, not
  the test list), unseen-class pixels 255. Evidence: the release's training loss is
  `one_hot(label, num_classes=len(train texts))`, channel i being the text of the
  i-th entry of the train class JSON (`PIE4class.json`, `DDSK3class.json`,
  `OEM5class.json`), and its `register_*_train.py` metadata lists the same classes with
  contiguous ids 0..K-1. So DDSK train value 1 is "forest" (test value 2), OEM train
  value 3 is "tree" (test value 4), and PIE train value 2 is "forest" (test value 4)
  even though the PIE training folder is named `D2masks6`. The readers reject any value
  >= len(train_classes) other than 255, so a training folder holding test-order labels
  fails loudly, naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmovseg_jax.data import segmentation as seg
from mmovseg_jax.data.imageio import PathLike

PIE_TRAIN = ("backbroad", "city", "forest", "farmland")
DDSK_TRAIN = ("city", "forest", "farmland")
OEM_TRAIN = ("bareland", "rangeland", "developedspace", "tree", "agricultureland")

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Folders:
    """Where one split lives: `root/dataset/split/{rgb_dir,sar_dir,label_dir}`.

    layout: "prepared" (the authors' copies, `segmentation.PreparedFolder`) or
    "synthetic" (`synthetic.SyntheticPairs`, no files; the other fields are unused).
    """

    dataset: str
    split: str
    rgb_dir: str
    sar_dir: str
    label_dir: str
    layout: str = "prepared"


@dataclass(frozen=True)
class Setting:
    """One train -> test benchmark.

    train_classes: names of training label values 0..K-1 (the seen classes).
    test_classes: names of test label values 0..T-1; every seen class is among them.
    """

    name: str
    train: Folders
    test: Folders
    train_classes: tuple[str, ...]
    test_classes: tuple[str, ...]

    def __post_init__(self):
        for what, classes in (("train", self.train_classes), ("test", self.test_classes)):
            if len(set(classes)) != len(classes) or not classes:
                raise ValueError(f"{self.name}: {what} classes must be distinct and non-empty: {classes}")
        extra = [c for c in self.train_classes if c not in self.test_classes]
        if extra:
            raise ValueError(f"{self.name}: train classes {extra} are not test classes")

    @property
    def seen(self) -> tuple[str, ...]:
        return self.train_classes

    @property
    def unseen(self) -> tuple[str, ...]:
        """Test classes absent from training, in test order."""
        return tuple(c for c in self.test_classes if c not in self.train_classes)

    def classes(self, split: str) -> tuple[str, ...]:
        return self.train_classes if _check_split(split) == "train" else self.test_classes

    def folders(self, split: str) -> Folders:
        return self.train if _check_split(split) == "train" else self.test

    def seen_mask(self) -> np.ndarray:
        """(T,) bool over test classes: True where the class is seen in training."""
        return np.array([c in self.train_classes for c in self.test_classes])

    def train_to_test(self) -> np.ndarray:
        """(K,) int64: test label value of each training label value."""
        return np.array([self.test_classes.index(c) for c in self.train_classes], np.int64)

    def test_to_train_lut(self) -> np.ndarray:
        """(256,) int16 lookup table test value -> training value; unseen classes -> 255."""
        mapping = {i: (self.train_classes.index(c) if c in self.train_classes else seg.IGNORE_LABEL)
                   for i, c in enumerate(self.test_classes)}
        return seg.label_lut(len(self.train_classes), mapping)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _pie(rgb_dir: str) -> tuple[Folders, Folders]:
    return (Folders("PIE_RGBSAR", "train", rgb_dir, "sar", "D2masks6"),
            Folders("PIE_RGBSAR", "val", rgb_dir, "sar", "D2masks6"))


_DDSK_TRAIN = Folders("DDSK", "train", "rgb_clouds", "sar", "D2masks3class")


def _oem(rgb_dir: str) -> tuple[Folders, Folders]:
    # SAR of OEM is `imgs`. The release's OEM-thin validation registers `OEM/rgb_cloud_thin`
    # (no `val/`), so its SAR path rewrite misses and the cloudy RGB is fed as SAR; here
    # thin validation reads `OEM/val/{rgb_cloud_thin,imgs,D2masks}`.
    return (Folders("OEM", "train", rgb_dir, "imgs", "D2masks5class"),
            Folders("OEM", "val", rgb_dir, "imgs", "D2masks"))


def _synthetic_setting() -> Setting:
    from mmovseg_jax.data.synthetic import CLASSES

    train = tuple(c for c in CLASSES if c not in ("road", "bare soil"))
    folders = [Folders("", split, "", "", "", layout="synthetic") for split in ("train", "val")]
    return Setting("synthetic", folders[0], folders[1], train, tuple(CLASSES))


SETTINGS: dict[str, Setting] = {
    "pie_cloud": Setting("pie_cloud", *_pie("rgb_clouds"), PIE_TRAIN, seg.PIE_CLASSES),
    "pie_clean": Setting("pie_clean", *_pie("rgb"), PIE_TRAIN, seg.PIE_CLASSES),
    "ddhr_sk": Setting("ddhr_sk", _DDSK_TRAIN, Folders("DDSK", "val", "rgb_clouds", "sar", "D2masks"),
                       DDSK_TRAIN, seg.DDSK_CLASSES),
    "ddhr_sk_to_ch": Setting("ddhr_sk_to_ch", _DDSK_TRAIN, Folders("DDCH", "val", "rgb_clouds", "sar", "D2masks"),
                             DDSK_TRAIN, seg.DDCH_CLASSES),
    "oem_thick": Setting("oem_thick", *_oem("rgb_cloud"), OEM_TRAIN, seg.OEM_CLASSES),
    "oem_thin": Setting("oem_thin", *_oem("rgb_cloud_thin"), OEM_TRAIN, seg.OEM_CLASSES),
    "synthetic": _synthetic_setting(),
}


def build_source(setting: Setting | str, split: str, root: PathLike | None = None, *, skip_unpaired: bool = False,
                 num_records: int = 64, size: int = 96, seed: int = 0, cache: bool = False,
                 skip_bad_samples: bool = False) -> Any:
    """Grain random-access source of labelled records of `setting`'s `split` ("train"/"test").

    Prepared layouts read `root/dataset/split/...` (`PreparedFolder`); a missing folder
    raises ValueError naming it. The synthetic setting ignores `root` and renders
    `num_records` scenes of `size` px (train seed `seed`, test seed `seed + 1`; kept in
    memory once rendered with `cache`), with
    labels in the split's class order (unseen classes 255 in training).
    skip_bad_samples: prepared layouts replace unreadable samples by the next readable
    one and count them in `source.skipped` (see `layouts`), instead of raising.
    Records: rgb (H, W, 3) uint8, sar (H, W) uint8, valid (H, W) bool, label (H, W) uint8
    (values index `setting.classes(split)`, 255 ignore), index int64.
    """
    if isinstance(setting, str):
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
        setting = SETTINGS[setting]
    folders = setting.folders(split)
    classes = setting.classes(split)
    if folders.layout == "synthetic":
        from mmovseg_jax.data.synthetic import SyntheticPairs

        base = SyntheticPairs(num_records, size, seed + (split == "test"), cache=cache)
        lut = setting.test_to_train_lut() if split == "train" else seg.label_lut(len(classes))
        return seg.Relabelled(base, lut, classes)
    if folders.layout != "prepared":
        raise ValueError(f"{setting.name}: unknown layout {folders.layout!r}")
    if root is None:
        raise ValueError(f"{setting.name}: build_source needs the dataset root folder")
    dataset = Path(root) / folders.dataset
    if not dataset.is_dir():
        raise ValueError(f"{setting.name} {split}: missing folder {dataset}")
    return seg.PreparedFolder(dataset, folders.split, folders.rgb_dir, folders.sar_dir, folders.label_dir, classes,
                              skip_unpaired=skip_unpaired, skip_bad_samples=skip_bad_samples)
