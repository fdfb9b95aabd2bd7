"""Packed optical + SAR records in ArrayRecord files, and a Grain source reading them.

Record encoding: one ArrayRecord record per sample, the bytes of `np.savez` (an
uncompressed .npz, read back with `allow_pickle=False`) holding the arrays `rgb` uint8
(H, W, 3), `sar` uint8 (H, W), and when the source had them `valid` bool (H, W) and
`label` uint8 (H, W). `index` is not stored: it is the record's global position.
Files are written with `group_size:1` (Grain's random-access requirement). A packed set is
one file `OUT`, or shards `OUT-00000-of-0000N` in record order (see `shard_paths`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence, SupportsIndex

import numpy as np

Record = dict[str, np.ndarray]
PathLike = str | os.PathLike

WRITER_OPTIONS = "group_size:1"
FIELDS = {"rgb": (np.uint8, 3), "sar": (np.uint8, 2), "valid": (np.bool_, 2), "label": (np.uint8, 2)}
REQUIRED = ("rgb", "sar")


def encode_record(record: Record, where: str = "record") -> bytes:
    """Canonical record -> npz bytes (fields `FIELDS`; `index` and unknown keys are not stored)."""
    check_record(record, where)
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.ascontiguousarray(record[k]) for k in FIELDS if k in record})
    return buffer.getvalue()


def decode_record(data: bytes, index: int, where: str = "record") -> Record:
    """npz bytes -> canonical record with `index` = np.int64(index)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            record = {k: npz[k] for k in npz.files}
    except Exception as e:
        raise ValueError(f"{where} {index}: not an npz-encoded optical/SAR record ({type(e).__name__}: {e})") from e
    check_record(record, f"{where} {index}")
    record["index"] = np.int64(index)
    return record


def check_record(record: Record, where: str) -> None:
    """ValueError naming `where` unless the record has the canonical dtypes, ranks and one (H, W)."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    size = record["rgb"].shape[:2]
    for key, (dtype, ndim) in FIELDS.items():
        if key not in record:
            continue
        a = record[key]
        if a.dtype != dtype or a.ndim != ndim or a.shape[:2] != size or (key == "rgb" and a.shape[2] != 3):
            raise ValueError(f"{where}: field {key!r} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} "
                             f"{'(H, W, 3)' if ndim == 3 else '(H, W)'} with (H, W) = {size}")


def shard_paths(out: PathLike, shards: int) -> list[Path]:
    """File names of a packed set: [OUT] for one shard, else OUT-00000-of-0000N, ..."""
    out = Path(out)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards == 1:
        return [out]
    return [out.with_name(f"{out.name}-{k:05d}-of-{shards:05d}") for k in range(shards)]


def resolve_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """Existing files for `paths`: each path itself, or else its shards OUT-*-of-* in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
            continue
        shards = sorted(path.parent.glob(f"{path.name}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"))
        if not shards:
            raise FileNotFoundError(f"{path}: no such ArrayRecord file (nor shards {path.name}-NNNNN-of-NNNNN)")
        found.extend(shards)
    if not found:
        raise ValueError("ArrayRecordPairs needs at least one path")
    return found


class ArrayRecordPairs:
    """Grain random-access source over packed records -> canonical dicts.

    paths: one file, a packed set's base name (its shards are found), or a list of them;
    records are numbered globally in the given order.
    """

    keys = None  # fields depend on what was packed

    def __init__(self, paths: PathLike | Sequence[PathLike]):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.paths = resolve_paths(paths)
        self._source = ArrayRecordDataSource([str(p) for p in self.paths])
        self._where = str(self.paths[0]) + (f" (+{len(self.paths) - 1} more)" if len(self.paths) > 1 else "")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = index.__index__()
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return decode_record(self._source[i], i, where=f"{self._where}: record")

    def __repr__(self) -> str:
        return f"ArrayRecordPairs({[str(p) for p in self.paths]}, {len(self)} records)"
