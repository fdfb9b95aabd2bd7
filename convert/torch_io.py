"""Reading and writing PyTorch checkpoints as {key: numpy array}.

Reads transformers folders (config.json + model.safetensors / pytorch_model.bin,
sharded or not), single `.safetensors` files, `torch.save` pickles (with wrapper dicts
such as {"teacher": ...} and `module.` / `backbone.` prefixes) and OpenAI's
TorchScript archives. Floating tensors become float32; their original dtype is
remembered so that converting back restores it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from convert.rules import ConversionError

WRAPPER_KEYS = ("teacher", "model", "state_dict", "module", "student")
STRIPPED_PREFIXES = ("module.", "backbone.")


def log(message: str) -> None:
    print(f"[convert] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Source:
    state: dict[str, np.ndarray]
    dtypes: dict[str, str]  # original dtype of every tensor that was not float32
    hf_config: dict | None
    folder: Path | None  # the folder of a transformers checkpoint (tokenizer files live there)
    notes: list[str]


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in requirements.txt
        raise ConversionError("reading PyTorch checkpoints needs torch (pip install torch==2.13.0)") from e
    return torch


def _to_numpy(value, key: str) -> tuple[np.ndarray, str]:
    torch = _torch()
    if not isinstance(value, torch.Tensor):
        raise ConversionError(f"{key}: expected a tensor, found {type(value).__name__}")
    t = value.detach().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    if t.is_floating_point():
        return t.float().numpy().copy(), dtype
    return t.numpy().copy(), dtype


def _load_pickle(path: Path, trust_pickle: bool):
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except RuntimeError as e:
        if "TorchScript" in str(e) or "constants.pkl" in str(e):  # OpenAI's JIT archives
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
    except Exception as e:  # unpickling errors come in many types
        hint = "" if trust_pickle else (" If you trust this file, pass --trust-pickle to allow arbitrary pickled "
                                        "objects (training checkpoints often hold argparse.Namespace).")
        raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint: "
                              f"{str(e).splitlines()[0]}.{hint}") from e


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin (nor a sharded index) found")


def _unwrap(obj, path: Path, checkpoint_key: str | None, notes: list[str]) -> Mapping:
    torch = _torch()
    if checkpoint_key is not None:
        if not isinstance(obj, Mapping) or checkpoint_key not in obj:
            keys = sorted(obj) if isinstance(obj, Mapping) else []
            raise ConversionError(f"{path}: no entry {checkpoint_key!r} (top-level keys: {keys})")
        obj = obj[checkpoint_key]
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        present = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not present:
            raise ConversionError(f"{path}: holds no tensors and none of the wrapper keys {WRAPPER_KEYS} "
                                  f"(top-level keys: {sorted(map(str, obj))})")
        if "teacher" in present and "student" in present:
            notes.append("took the 'teacher' weights (pass --checkpoint-key student for the student)")
        obj = obj[present[0]]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _strip(state: dict, notes: list[str]) -> dict:
    for prefix in STRIPPED_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            notes.append(f"removed the key prefix {prefix!r}")
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def read_source(path: str | os.PathLike, checkpoint_key: str | None = None, prefix: str | None = None,
                trust_pickle: bool = False) -> Source:
    """Reads a checkpoint file or transformers folder into float32 numpy arrays.

    `prefix` keeps only the keys under it (and removes it), to take one encoder out of a
    larger model's checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    notes: list[str] = []
    hf_config, folder = None, None
    if path.is_dir():
        folder = path
        if (path / "config.json").is_file():
            hf_config = json.loads((path / "config.json").read_text())
        raw = {}
        for f in _weight_files(path):
            log(f"reading {f}")
            raw.update(_load_safetensors(f) if f.suffix == ".safetensors" else _unwrap(_load_pickle(f, trust_pickle), f, None, notes))
    else:
        log(f"reading {path}")
        if path.suffix == ".safetensors":
            raw = _load_safetensors(path)
        else:
            raw = _unwrap(_load_pickle(path, trust_pickle), path, checkpoint_key, notes)
            raw = _strip(dict(raw), notes)
    if prefix:
        kept = {k.removeprefix(prefix): v for k, v in raw.items() if k.startswith(prefix)}
        if not kept:
            raise ConversionError(f"{path}: no key starts with {prefix!r}")
        notes.append(f"took the {len(kept)} keys under {prefix!r}, left out {len(raw) - len(kept)} others")
        raw = kept
    state, dtypes = {}, {}
    for key, value in raw.items():
        state[key], dtype = _to_numpy(value, key)
        if dtype != "float32":
            dtypes[key] = dtype
    return Source(state, dtypes, hf_config, folder, notes)


def _to_tensor(value: np.ndarray, dtype: str | None):
    torch = _torch()
    value = np.asarray(value)
    # np.ascontiguousarray turns 0-d arrays (e.g. logit_scale) into shape (1,); keep the shape.
    t = torch.from_numpy(np.ascontiguousarray(value).reshape(value.shape))
    return t.to(getattr(torch, dtype)) if dtype else t


def write_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                     dtypes: Mapping[str, str] | None = None, wrapper: str | None = None) -> Path:
    """Writes tensors to `path` (.safetensors, or a torch.save pickle for any other suffix),
    restoring recorded dtypes; a pickle is saved as {wrapper: tensors} when `wrapper` is
    given. Written to a temporary file first, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: _to_tensor(v, (dtypes or {}).get(k)) for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            _torch().save({wrapper: tensors} if wrapper else tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
