"""Data sources and iterators named by a training config (`config.data`, `config.eval`).

Sources: the built-in synthetic world, a paired `rgb/` + `sar/` folder, SpaceNet 6,
DFC2023 track 1, CMU-Data (SpaceNet 6 + DFC2023) and packed ArrayRecord files. The
last `config.eval.num_pairs` records are held out for evaluation; training draws from
the rest.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections

from mmovseg_jax.data import augment, pipeline

SOURCES = ("synthetic", "folder", "spacenet6", "dfc2023", "cmu", "arrayrecord")


class Subset:
    """Records `indices` of `base`, as a random-access source."""

    def __init__(self, base: Any, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.base[self.indices[i]]

    @property
    def skipped(self) -> int:
        """The base source's count of bad-sample requests it replaced (shared by every
        Subset of that base; 0 for sources that do not skip)."""
        return getattr(self.base, "skipped", 0)

    def skip_report(self) -> str | None:
        """The base source's one-line skip summary, None if nothing was skipped."""
        report = getattr(self.base, "skip_report", None)
        return report() if report else None


def _require(value: str, field: str) -> str:
    if not value:
        raise ValueError(f"config.data.{field} is empty: the {field.removesuffix('_root')} source needs a path")
    return value


def build(data: ml_collections.ConfigDict, seed: int) -> Any:
    """The whole source named by config.data.source. File-backed sources replace unreadable
    samples (counted in `.skipped`) when config.data.skip_bad_samples is True (absent: False)."""
    from mmovseg_jax.data import layouts

    kind = data.source
    skip = {"skip_bad_samples": bool(data.get("skip_bad_samples", False))}
    if kind == "synthetic":
        from mmovseg_jax.data.synthetic import SyntheticPairs

        return SyntheticPairs(data.num_records, data.tile_size, seed, cache=data.get("cache", False))
    if kind == "folder":
        return layouts.PairedFolder(_require(data.root, "root"), **skip)
    if kind == "spacenet6":
        return layouts.SpaceNet6(_require(data.spacenet6_root, "spacenet6_root"), sar_band=data.spacenet6_band,
                                 **skip)
    if kind == "dfc2023":
        return layouts.DFC2023(_require(data.dfc2023_root, "dfc2023_root"), split=data.dfc2023_split, **skip)
    if kind == "cmu":
        return layouts.ConcatSource(
            layouts.SpaceNet6(_require(data.spacenet6_root, "spacenet6_root"), sar_band=data.spacenet6_band,
                              **skip),
            layouts.DFC2023(_require(data.dfc2023_root, "dfc2023_root"), split=data.dfc2023_split, **skip))
    if kind == "arrayrecord":
        from mmovseg_jax.data.arrayrecord import ArrayRecordPairs

        return ArrayRecordPairs([p for p in _require(data.root, "root").split(",") if p])
    raise ValueError(f"config.data.source: {kind!r} is not one of {SOURCES}")


def train_and_eval(config: ml_collections.ConfigDict) -> tuple[Subset, Subset]:
    """(training records, held-out evaluation records) of the configured source."""
    source = build(config.data, config.seed)
    held_out = config.eval.num_pairs
    if held_out < 2 or held_out >= len(source):
        raise ValueError(f"config.eval.num_pairs = {held_out} must be at least 2 and below the source's "
                         f"{len(source)} records")
    if held_out % config.eval.batch_size:
        raise ValueError(f"config.eval.num_pairs = {held_out} is not a multiple of config.eval.batch_size = "
                         f"{config.eval.batch_size}")
    n = len(source)
    return Subset(source, range(n - held_out)), Subset(source, range(n - held_out, n))


def train_iterator(source: Any, config: ml_collections.ConfigDict, start_batch: int = 0):
    """Endless, shuffled, augmented batches of config.global_batch_size pairs (this process's
    share), from global batch `start_batch` on."""
    a = config.data.augment
    transform = augment.PairedAugment(config.data.crop_size, scale=tuple(a.scale),
                                      max_rotation_deg=a.max_rotation_deg, flip=a.flip, translate=a.translate)
    return pipeline.make_iterator(source, global_batch_size=config.global_batch_size, seed=config.seed,
                                  train=True, augment=transform, worker_count=config.data.worker_count,
                                  start_batch=start_batch)


def eval_iterator(source: Any, config: ml_collections.ConfigDict):
    """One pass over `source` in order, centre-cropped, in batches of config.eval.batch_size."""
    return pipeline.make_iterator(source, global_batch_size=config.eval.batch_size, seed=config.seed,
                                  train=False, augment=augment.CenterCrop(config.data.crop_size),
                                  worker_count=0, num_epochs=1)


def data_position(global_batches: int) -> dict:
    """The input stream's position as a checkpoint stores it: global batches consumed. It
    does not depend on the process count, so a checkpoint restores on any mesh."""
    return {"global_batches": int(global_batches), "process_count": jax.process_count()}


def start_batch(data_state: dict | None, step: int) -> int:
    """Where a resumed run's stream starts: the stored position, else one batch per step."""
    if data_state is None:
        return step
    if "global_batches" not in data_state:
        raise ValueError(f"checkpoint data state {sorted(data_state)} has no 'global_batches' position")
    return int(data_state["global_batches"])
