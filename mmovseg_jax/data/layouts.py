"""Grain random-access sources over the original optical + SAR dataset layouts.

Every source indexes file paths at construction and reads files lazily in `__getitem__`,
returning the canonical record:

    rgb   uint8 (H, W, 3)
    sar   uint8 (H, W)       single channel, 0..255
    valid bool  (H, W)       False on SAR no-data pixels (every source here emits it)
    label uint8 (H, W)       255 = ignore; only where the source has labels
    index np.int64           position in the source

Samples are sorted by their pairing key (file stem), so indices are stable across runs.
The pixel conventions (percentile stretch, dB mapping) are those of `imageio`.
Sources hold only paths and settings, so they pickle into Grain worker processes.

Bad samples (a missing, corrupt or truncated file, files of different sizes, a wrong
band count or dtype, label values outside the class list) raise ValueError or OSError
naming the file. With `skip_bad_samples=True` the file-backed sources instead serve the
next readable sample (index order, wrapping), warn once per bad sample, and count:
`source.skipped` is the number of requests answered by a replacement (each bad sample
once per epoch), `source.bad_samples` maps each bad sample's key to the reason and
`source.skip_report()` gives one summary line. The counts are those of this process
(a Grain worker process counts in its own copy of the source).
"""

from __future__ import annotations

import bisect
import operator
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, SupportsIndex

import numpy as np

from mmovseg_jax.data.imageio import (DEFAULT_DB_RANGE, IMAGE_EXTENSIONS, PathLike, read_image, sar_single_band,
                                      sar_to_uint8, to_label, to_uint8_rgb)

Record = dict[str, np.ndarray]

SN6_BANDS = ("HH", "HV", "VH", "VV")
# SpaceNet 6 SAR-Intensity holds dB of uncalibrated intensity, positive with a maximum of
# about 92.9 in public SN6 pipelines; 0 is no-data. The default maps 0..93 dB to 0..255.
SN6_DB_RANGE = (0.0, 93.0)

_MAX_LISTED = 5


@dataclass(frozen=True)
class Sample:
    """Files of one sample; `rotate` asks for a 180-degree rotation of every array."""

    key: str
    rgb: Path
    sar: Path
    label: Path | None = None
    rotate: bool = False


class _FileSource:
    """Base of the file-backed sources: len / getitem over a list of `Sample`s.

    skip_bad_samples: False raises the error of a bad sample (naming its file); True
    replaces it by the next readable sample and counts it (see the module docstring).
    """

    keys: tuple[str, ...] = ("rgb", "sar", "valid")

    def __init__(self, samples: list[Sample], where: PathLike, *, skip_bad_samples: bool = False):
        if not samples:
            raise ValueError(f"{where}: no optical/SAR pairs found")
        self.samples = samples
        self.where = str(where)
        self.skip_bad_samples = bool(skip_bad_samples)
        self.skipped = 0  # requests answered by a replacement for a bad sample
        self.bad_samples: dict[str, str] = {}  # key -> reason (one line naming the file)
        self._bad_indices: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = _normalise_index(index, len(self))
        if not self.skip_bad_samples:
            record = self._load(self.samples[i])
        else:
            i, record = self._load_or_replace(i)
        record["index"] = np.int64(i)
        return record

    def _load_or_replace(self, i: int) -> tuple[int, Record]:
        """(index, record) of sample i, or of the next readable one if i is bad."""
        n = len(self)
        for step in range(n):
            j = (i + step) % n
            if j in self._bad_indices:
                if step == 0:
                    self._count_skip()
                continue
            try:
                return j, self._load(self.samples[j])
            except (ValueError, OSError) as e:
                self._mark_bad(j, e)
                if step == 0:
                    self._count_skip()
        raise ValueError(f"{self.where}: all {n} samples are bad; first: {next(iter(self.bad_samples.values()))}")

    def _count_skip(self) -> None:
        with self._lock:
            self.skipped += 1

    def _mark_bad(self, j: int, error: BaseException) -> None:
        reason = " ".join(str(error).split()) or type(error).__name__
        with self._lock:
            new = j not in self._bad_indices
            self._bad_indices.add(j)
            self.bad_samples[self.samples[j].key] = reason
        if new:
            warnings.warn(f"skipping bad sample {self.samples[j].key!r}: {reason}", stacklevel=4)

    def skip_report(self) -> str | None:
        """One line `skipped N bad sample request(s) (K distinct: names...)`, None if none."""
        if not self.skipped:
            return None
        return (f"{self.where}: skipped {self.skipped} bad sample request(s) ({len(self.bad_samples)} distinct: "
                f"{_listing(sorted(self.bad_samples))})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock", None)  # locks do not pickle; each process gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def name(self, index: SupportsIndex) -> str:
        """The pairing key (file stem) of sample `index`."""
        return self.samples[_normalise_index(index, len(self))].key

    def _load(self, sample: Sample) -> Record:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples)"


class PairedFolder(_FileSource):
    """Paired files with the same stem in sibling folders of `root`.

    Layout: `root/{rgb_dir}/<name>.<ext>`, `root/{sar_dir}/<name>.<ext>` and optionally
    `root/{label_dir}/<name>.<ext>`, ext one of .png .jpg .jpeg .tif .tiff (may differ
    between folders). This is the layout of the authors' prepared MM-OVSeg copies (e.g.
    root=`PIE_RGBSAR/train`, rgb_dir="rgb_clouds", label_dir="D2masks6"), of DDHR and of
    PIE-RGB-SAR. uint8 SAR is used as is; other SAR dtypes are mapped with `sar_db`,
    `db_range` and `sar_nodata` (see `imageio.sar_to_uint8`).
    Files without a partner raise ValueError listing the first few, unless
    `skip_unpaired`, which skips them (counted in `num_unpaired`, reported as a warning).
    A sample that cannot be read raises naming its file, unless `skip_bad_samples`
    (replaced and counted in `skipped`, see the module docstring).
    """

    def __init__(self, root: PathLike, rgb_dir: str = "rgb", sar_dir: str = "sar", label_dir: str | None = None, *,
                 skip_unpaired: bool = False, sar_db: bool = True,
                 db_range: tuple[float, float] = DEFAULT_DB_RANGE, sar_nodata: float | None = None,
                 skip_bad_samples: bool = False):
        self.root = Path(root)
        self.sar_db, self.db_range, self.sar_nodata = sar_db, tuple(db_range), sar_nodata
        folders = {"rgb": self.root / rgb_dir, "sar": self.root / sar_dir}
        if label_dir is not None:
            folders["label"] = self.root / label_dir
            self.keys = ("rgb", "sar", "valid", "label")
        files = {role: index_files(folder, _stem) for role, folder in folders.items()}
        keys, self.num_unpaired = pair_keys(files, where=self.root, skip_unpaired=skip_unpaired)
        samples = [Sample(k, files["rgb"][k], files["sar"][k], files["label"][k] if "label" in files else None)
                   for k in keys]
        super().__init__(samples, self.root, skip_bad_samples=skip_bad_samples)

    def _load(self, sample: Sample) -> Record:
        arrays = {sample.rgb: read_image(sample.rgb), sample.sar: sar_single_band(read_image(sample.sar), sample.sar)}
        if sample.label is not None:
            arrays[sample.label] = read_image(sample.label)
        check_same_size(arrays)
        sar, valid = sar_to_uint8(arrays[sample.sar], sample.sar, db=self.sar_db, db_range=self.db_range,
                                  nodata=self.sar_nodata)
        record = {"rgb": to_uint8_rgb(arrays[sample.rgb], sample.rgb), "sar": sar, "valid": valid}
        if sample.label is not None:
            record["label"] = to_label(arrays[sample.label], sample.label)
        return record

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} samples)"


class DFC2023(PairedFolder):
    """IEEE GRSS DFC2023 track 1 (one half of CMU-Data).

    Layout: `root/{split}/rgb/<id>.tif` (3-band uint8) and `root/{split}/sar/<id>.tif`
    (1-band), 512x512. uint8 SAR is used as is. Float / wider-integer SAR is taken as
    linear intensity by default (`sar_db=False`: 10 log10, values <= 0 are no-data), or
    as dB with `sar_db=True`; then clipped to `db_range` and scaled to 0..255.
    """

    def __init__(self, root: PathLike, split: str = "train", *, sar_db: bool = False,
                 db_range: tuple[float, float] = DEFAULT_DB_RANGE, nodata: float | None = None,
                 skip_unpaired: bool = False, skip_bad_samples: bool = False):
        self.split = split
        super().__init__(Path(root) / split, "rgb", "sar", skip_unpaired=skip_unpaired, sar_db=sar_db,
                         db_range=db_range, sar_nodata=nodata, skip_bad_samples=skip_bad_samples)


class SpaceNet6(_FileSource):
    """SpaceNet 6 (Rotterdam), the other half of CMU-Data.

    Layout under `root/{split_dir}`:
      PS-RGB/SN6_Train_AOI_11_Rotterdam_PS-RGB_<stamp>_tile_<n>.tif         3-band uint8 (uint16 ok)
      SAR-Intensity/SN6_Train_AOI_11_Rotterdam_SAR-Intensity_<stamp>_tile_<n>.tif
                                                 4-band float32 dB (HH, HV, VH, VV), 0 = no-data
      SummaryData/SAR_orientations.txt           lines `<stamp> <0|1>`
    <stamp> is the strip's `<start>_<end>` timestamps. Files pair by `<stamp>_tile_<n>`.
    `sar_band` picks one polarisation; zeros are no-data (valid=False); dB is clipped to
    `db_range` and scaled to 0..255.

    Orientation: strips flagged 1 were imaged from the opposite side (south). With
    `rotate_by_orientation`, BOTH rgb and sar (and valid) of those tiles are rotated by 180
    degrees, so the radar look direction is the same in every sample, as the SpaceNet 6
    baseline does; the optical image turns with the SAR so the pair stays co-registered.
    A missing orientation file (or a strip absent from it) gives a warning and no rotation.
    """

    keys = ("rgb", "sar", "valid")

    def __init__(self, root: PathLike, split_dir: str = "train/AOI_11_Rotterdam", sar_band: str = "HH",
                 db_range: tuple[float, float] = SN6_DB_RANGE, rotate_by_orientation: bool = True, *,
                 skip_unpaired: bool = False, skip_bad_samples: bool = False):
        if sar_band.upper() not in SN6_BANDS:
            raise ValueError(f"sar_band must be one of {', '.join(SN6_BANDS)}, got {sar_band!r}")
        self.root = Path(root) / split_dir
        self.sar_band, self.band_index = sar_band.upper(), SN6_BANDS.index(sar_band.upper())
        self.db_range = tuple(db_range)
        files = {"rgb": index_files(self.root / "PS-RGB", _sn6_key("PS-RGB")),
                 "sar": index_files(self.root / "SAR-Intensity", _sn6_key("SAR-Intensity"))}
        keys, self.num_unpaired = pair_keys(files, where=self.root, skip_unpaired=skip_unpaired)
        flags = self._orientations(keys) if rotate_by_orientation else {}
        samples = [Sample(k, files["rgb"][k], files["sar"][k], rotate=flags.get(sn6_strip(k), 0) == 1) for k in keys]
        super().__init__(samples, self.root, skip_bad_samples=skip_bad_samples)

    def _orientations(self, keys: list[str]) -> dict[str, int]:
        path = self.root / "SummaryData" / "SAR_orientations.txt"
        if not path.is_file():
            warnings.warn(f"{path}: not found; SpaceNet 6 tiles are not rotated by look direction", stacklevel=3)
            return {}
        flags = read_sar_orientations(path)
        missing = sorted({sn6_strip(k) for k in keys} - set(flags))
        if missing:
            warnings.warn(f"{path}: {len(missing)} strip(s) not listed, their tiles are not rotated: "
                          f"{_listing(missing)}", stacklevel=3)
        return flags

    def _load(self, sample: Sample) -> Record:
        rgb_raw, sar_raw = read_image(sample.rgb), read_image(sample.sar)
        if sar_raw.ndim != 3 or sar_raw.shape[2] != len(SN6_BANDS):
            raise ValueError(f"{sample.sar}: SpaceNet 6 SAR-Intensity must have 4 bands ({', '.join(SN6_BANDS)}), "
                             f"got shape {sar_raw.shape}")
        check_same_size({sample.rgb: rgb_raw, sample.sar: sar_raw})
        sar, valid = sar_to_uint8(sar_raw[..., self.band_index], sample.sar, db=True, db_range=self.db_range, nodata=0)
        record = {"rgb": to_uint8_rgb(rgb_raw, sample.rgb), "sar": sar, "valid": valid}
        if sample.rotate:
            record = {k: np.ascontiguousarray(np.rot90(v, 2)) for k, v in record.items()}
        return record

    def __repr__(self) -> str:
        return f"SpaceNet6({str(self.root)!r}, {len(self)} samples, band {self.sar_band})"


class ConcatSource:
    """Concatenation of sources (e.g. CMU-Data = SpaceNet6 + DFC2023); `index` is global.

    Record i comes from the source holding position i in the concatenated order. Sources
    that declare `keys` must declare the same ones (so batches are uniform).
    """

    def __init__(self, *sources):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        declared = {tuple(s.keys) for s in sources if getattr(s, "keys", None) is not None}
        if len(declared) > 1:
            raise ValueError(f"ConcatSource: sources return different fields: {sorted(declared)}")
        self.sources = list(sources)
        self.keys = declared.pop() if declared else None
        self.offsets = np.cumsum([0] + [len(s) for s in sources]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = _normalise_index(index, len(self))
        k = bisect.bisect_right(self.offsets, i) - 1
        record = dict(self.sources[k][i - self.offsets[k]])
        record["index"] = np.int64(i)
        return record

    @property
    def skipped(self) -> int:
        """Bad-sample requests replaced by the member sources (0 for sources that do not skip)."""
        return sum(getattr(s, "skipped", 0) for s in self.sources)

    def skip_report(self) -> str | None:
        """The members' skip reports, joined on one line; None if nothing was skipped."""
        reports = [r for s in self.sources if (r := getattr(s, "skip_report", lambda: None)())]
        return "; ".join(reports) or None

    def __repr__(self) -> str:
        return f"ConcatSource({', '.join(map(repr, self.sources))})"


# ---- indexing helpers ---------------------------------------------------------------------------------------


def index_files(folder: Path, key_of: Callable[[Path], str | None]) -> dict[str, Path]:
    """Image files of `folder` by pairing key; files whose key is None are ignored."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        key = key_of(path)
        if key is None:
            continue
        if key in files:
            raise ValueError(f"{folder}: two files for sample {key!r}: {files[key].name}, {path.name}")
        files[key] = path
    return files


def pair_keys(files: dict[str, dict[str, Path]], *, where: PathLike, skip_unpaired: bool) -> tuple[list[str], int]:
    """Sorted keys present in every role of `files` (role -> key -> path), and the unpaired count.

    Unpaired files raise ValueError naming the first few, or with `skip_unpaired` are
    skipped with a warning giving their number.
    """
    common = set.intersection(*(set(f) for f in files.values()))
    unpaired = [f"{p.parent.name}/{p.name}" for f in files.values() for k, p in sorted(f.items()) if k not in common]
    if unpaired and not skip_unpaired:
        raise ValueError(f"{where}: {len(unpaired)} file(s) without a partner of the same name: {_listing(unpaired)} "
                         "(pass skip_unpaired=True to skip them)")
    if unpaired:
        warnings.warn(f"{where}: skipped {len(unpaired)} unpaired file(s): {_listing(unpaired)}", stacklevel=3)
    return sorted(common), len(unpaired)


def check_same_size(arrays: dict[Path, np.ndarray]) -> None:
    """ValueError naming every file and its shape when the (H, W) of the arrays differ."""
    if len({a.shape[:2] for a in arrays.values()}) > 1:
        detail = "; ".join(f"{path} has shape {a.shape}" for path, a in arrays.items())
        raise ValueError(f"image sizes differ within one sample: {detail}")


def read_sar_orientations(path: PathLike) -> dict[str, int]:
    """SpaceNet 6 `SAR_orientations.txt` -> {strip stamp: 0 or 1}."""
    flags = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1"):
            raise ValueError(f"{path}:{n}: expected '<strip> <0|1>', got {line!r}")
        flags[parts[0]] = int(parts[1])
    return flags


def sn6_strip(key: str) -> str:
    """'<start>_<end>_tile_<n>' -> '<start>_<end>' (the strip stamp of the orientation file)."""
    return key.rsplit("_tile_", 1)[0]


def _sn6_key(kind: str) -> Callable[[Path], str | None]:
    pattern = re.compile(rf"_{re.escape(kind)}_(.+_tile_\d+)$")

    def key_of(path: Path) -> str | None:
        match = pattern.search(path.stem)
        return match.group(1) if match else None

    return key_of


def _stem(path: Path) -> str:
    return path.stem


def _listing(names: Sequence[str]) -> str:
    return ", ".join(names[:_MAX_LISTED]) + (", ..." if len(names) > _MAX_LISTED else "")


def _normalise_index(index: SupportsIndex, length: int) -> int:
    i = operator.index(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for {length} samples")
    return i
