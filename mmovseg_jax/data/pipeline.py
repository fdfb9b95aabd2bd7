"""Grain input pipeline: source -> shuffle/repeat -> augment -> per-process shard -> batch.

The iterator is checkpointable: ``it.get_state()`` / ``it.set_state(state)`` on a fresh
iterator built with the same arguments resumes with exactly the batches the first one
would have produced (``iterator_state_to_json`` / ``iterator_state_from_json`` make the
state a JSON string, e.g. for Orbax's ``JsonSave``).

Augmentation runs before sharding, so the random geometry of a record depends on its
position in the global (shuffled, repeated) stream only, not on the number of processes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import grain
import numpy as np

DEFAULT_READ_OPTIONS = dict(num_threads=4, prefetch_buffer_size=8)


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), defaulting to JAX's view of the job."""
    if process_index is None or process_count is None:
        import jax  # deferred: only needed for the defaults

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    return int(process_index), int(process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                         f"process count {process_count}")
    return global_batch_size // process_count


def _augment_seed(seed: int) -> int:
    """Seed for random augmentations, decorrelated from the shuffle seed."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def _apply_augment(ds: grain.MapDataset, augment: Any, seed: int) -> grain.MapDataset:
    """Applies a grain RandomMap (seeded per record position), a grain Map, or a 1-arg callable."""
    if augment is None:
        return ds
    if isinstance(augment, grain.transforms.RandomMap):
        return ds.random_map(augment, seed=_augment_seed(seed))
    if isinstance(augment, grain.transforms.Map) or callable(augment):
        return ds.map(augment)
    raise TypeError(f"augment must be a grain RandomMap/Map or a callable, got {type(augment)}")


def _ensure_absl_flags_parsed() -> None:
    """Grain <= 0.2.18 reads an absl flag when starting worker processes, which fails in
    programs that never parse flags (google/grain#1355). Mark them parsed (defaults) then."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_dataset(source: Any, *, global_batch_size: int, seed: int, train: bool, augment: Any = None,
                  num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, start_batch: int = 0) -> grain.MapDataset:
    """The per-process batched MapDataset behind `make_iterator` (see there for arguments).

    Global batch j holds records j * global_batch_size ... (j + 1) * global_batch_size - 1
    of the global stream, whatever the process count, so `start_batch` = j resumes the
    stream on any number of processes (elastic restore)."""
    process_index, process_count = _process_layout(process_index, process_count)
    batch_size = _local_batch_size(global_batch_size, process_count)
    ds = grain.MapDataset.source(source)
    if train:
        ds = ds.shuffle(seed=seed).repeat(num_epochs)
    elif num_epochs not in (None, 1):
        ds = ds.repeat(num_epochs, reseed_each_epoch=False)
    ds = _apply_augment(ds, augment, seed)
    ds = ds[process_index::process_count].batch(batch_size, drop_remainder=train)
    return ds[start_batch:] if start_batch else ds


def make_iterator(source: Any, *, global_batch_size: int, seed: int, train: bool, augment: Any = None,
                  worker_count: int = 0, num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, read_options: grain.ReadOptions | None = None,
                  start_batch: int = 0) -> grain.DatasetIterator:
    """Checkpointable iterator of this process's batches.

    source: random-access records (``__len__``/``__getitem__``), dicts of numpy arrays.
    train: shuffle with `seed`, repeat `num_epochs` times (None: forever), drop the last
      partial batch. Otherwise: source order, one pass (or `num_epochs` passes), partial last
      batch kept (processes may then see different batch counts).
    augment: grain RandomMap (e.g. PairedAugment; seeded from `seed` and the record's
      position in the global stream), grain Map (e.g. CenterCrop) or a 1-arg callable.
    Process p of P takes records p, p + P, ... of the global stream, in batches of
      global_batch_size // P (ValueError naming global_batch_size if not divisible);
      p and P default to jax.process_index() / jax.process_count().
    worker_count > 0: records are produced in that many worker processes (mp_prefetch).
    read_options: threads/prefetch in the producing process(es); default 4 threads, 8 batches.
    start_batch: skip the first global batches (resume at a step, on any process count).

    Yields dicts of numpy arrays with a leading batch axis b, e.g. rgb (b, S, S, 3) uint8,
    sar (b, S, S) uint8, label (b, S, S) uint8 / valid (b, S, S) bool when present, index (b,) int64.
    """
    ds = build_dataset(source, global_batch_size=global_batch_size, seed=seed, train=train, augment=augment,
                       num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                       start_batch=start_batch)
    iter_ds = ds.to_iter_dataset(read_options or grain.ReadOptions(**DEFAULT_READ_OPTIONS))
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(iter_ds)


# ----------------------------------------------------------------------------- state <-> JSON

_BYTES_TAG = "__bytes_b64__"


def _encode(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return {_BYTES_TAG: base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_BYTES_TAG}:
            return base64.b64decode(obj[_BYTES_TAG])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def iterator_state_to_json(state: dict[str, Any]) -> str:
    """Iterator state (from `it.get_state()`) -> JSON string; bytes are base64-tagged."""
    return json.dumps(_encode(state), sort_keys=True)


def iterator_state_from_json(text: str) -> dict[str, Any]:
    """Inverse of `iterator_state_to_json`: JSON string -> state for `it.set_state`."""
    return _decode(json.loads(text))

