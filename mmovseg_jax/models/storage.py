"""On-disk form of a converted encoder: a folder holding

    model.json   {"family": "dino" | "dinov3" | "clip" | "mmovseg", "config": {...}, "source": {...}}
    params/      Orbax checkpoint of the parameters (nested dict, float32)
    extras.npz   tensors of the source checkpoint that are not part of the
                 architecture (a pooler, a DINO projection head, position-id
                 buffers), kept so that converting back loses nothing
    vocab.json, merges.txt, ...   CLIP tokenizer files (CLIP and full MM-OVSeg models)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mmovseg_jax.models import clip, dino, dinov3, layers, params

FORMAT_VERSION = 1


def _families() -> dict[str, tuple[type, Any]]:
    from mmovseg_jax.models import mmovseg

    return {"dino": (dino.Model, lambda d: dino.Config(**d)),
            "clip": (clip.Model, clip.Config.from_dict),
            "dinov3": (dinov3.Model, dinov3.Config.from_dict),
            "mmovseg": (mmovseg.Model, mmovseg.Config.from_dict)}


def config_from_dict(family: str, config: Mapping) -> Any:
    """Rebuilds the dataclass config of `family` from its JSON dict."""
    if family not in _families():
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_families())}")
    return _families()[family][1](dict(config))


def build_abstract(family: str, config: Any) -> nnx.Module:
    """The model of `family` with shape-only parameters (nothing allocated)."""
    cls = _families()[family][0]
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(value)
    return nested


def _flatten(nested: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = np.asarray(value)
    return flat


def save(folder: str | os.PathLike, family: str, config: Any, flat_params: Mapping[str, np.ndarray],
         source: Mapping | None = None, extras: Mapping[str, np.ndarray] | None = None,
         files: Sequence[str | os.PathLike] = ()) -> Path:
    """Writes a converted-model folder; `files` (e.g. tokenizer files) are copied into it.

    The parameters are checked against the architecture first, and the folder is written
    beside the target then renamed into place, so an error leaves nothing behind. float8
    GEMMs, a bfloat16 residual stream and the tanh GELU are speed choices of a run, not
    part of the weights: the stored config has them off (pass them to `load_model` to run
    the loaded model so)."""
    folder = Path(folder).absolute()
    config = with_kernels(config, **{k: v for k, v in KERNEL_DEFAULTS.items() if v is not None})
    abstract = build_abstract(family, config)
    params.check_params(params.param_shapes_of(abstract), flat_params, f"parameters for {family}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        # Host arrays written by this process alone (in a multi-host run, by the one that
        # calls save), without the cross-process barriers of a sharded checkpoint.
        this_process = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                          active_processes={jax.process_index()})
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=this_process)
        checkpointer.save(staging / "params", _nest(flat_params))
        checkpointer.wait_until_finished()
        if extras:
            np.savez(staging / "extras.npz", **{k: np.asarray(v) for k, v in extras.items()})
        meta = {"format_version": FORMAT_VERSION, "family": family,
                "config": dataclasses.asdict(config), "source": dict(source or {})}
        for f in files:
            shutil.copyfile(f, staging / Path(f).name)
        (staging / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


@dataclasses.dataclass
class Stored:
    family: str
    config: Any
    params: dict[str, np.ndarray]
    source: dict
    extras: dict[str, np.ndarray]


def read(folder: str | os.PathLike) -> Stored:
    """Reads a converted-model folder into host arrays."""
    folder = Path(folder).absolute()
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found; is {folder} a folder written by convert.to_flax?")
    meta = json.loads(meta_path.read_text())
    for key in ("family", "config"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key {key!r}")
    config = config_from_dict(meta["family"], meta["config"])
    restored = ocp.StandardCheckpointer().restore(folder / "params")
    extras = {}
    if (folder / "extras.npz").is_file():
        with np.load(folder / "extras.npz") as z:
            extras = {k: z[k] for k in z.files}
    return Stored(meta["family"], config, _flatten(restored), meta.get("source", {}), extras)


# The run-time speed choices of the vision encoders, with the values a stored model keeps.
KERNEL_DEFAULTS = {"attention": None, "fp8": False, "residual_dtype": "float32", "gelu": "exact"}


def with_kernels(config: Any, attention: str | None = None, fp8: bool | None = None,
                 residual_dtype: str | None = None, gelu: str | None = None) -> Any:
    """`config` (a DINO, DINOv3, CLIP or MM-OVSeg config) with every vision encoder's speed
    choices set; None keeps what the config has.

    attention: "xla" | "cudnn" | "auto" (layers.attention). fp8: the block matrix
    multiplies in float8 (layers.Dense). residual_dtype: "float32" | "bfloat16", the
    residual stream's dtype. gelu: "exact" | "tanh", the DINO/DINOv3 MLP activation
    (CLIP keeps its quick_gelu). CLIP's text tower keeps XLA attention, bf16/fp32 GEMMs
    and a float32 residual stream."""
    given = {"attention": attention, "fp8": fp8, "residual_dtype": residual_dtype, "gelu": gelu}
    if hasattr(config, "vision"):  # CLIP
        return dataclasses.replace(config, vision=with_kernels(config.vision, **given))
    if hasattr(config, "clip") and hasattr(config, "dino"):  # the MM-OVSeg model
        return dataclasses.replace(config, clip=with_kernels(config.clip, **given),
                                   dino=with_kernels(config.dino, **given))
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None and k in fields})


def kernel_choices(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The speed choices (`with_kernels`' keywords) a run's config.model asks for; fields it
    lacks take the defaults a stored model keeps (attention unchanged). A value that is not
    one of the choices is refused with the field's name."""
    choices = {k: model_config.get(k, default) for k, default in KERNEL_DEFAULTS.items()}
    allowed = {"attention": layers.ATTENTION_IMPLEMENTATIONS, "residual_dtype": layers.RESIDUAL_DTYPES,
               "gelu": tuple(layers.GELUS), "fp8": (False, True)}
    for key, values in allowed.items():
        if choices[key] is not None and choices[key] not in values:
            raise ValueError(f"config.model.{key}: {choices[key]!r} is not one of {', '.join(map(str, values))}")
    return choices


def rebuild(model: nnx.Module, family: str, dtype: str | None = None, attention: str | None = None,
            fp8: bool | None = None, residual_dtype: str | None = None, gelu: str | None = None) -> nnx.Module:
    """A new `family` model holding `model`'s parameters (copied to the host), with the
    compute dtype and vision-encoder speed choices changed as `load_model` takes them;
    None keeps the model's own. Frozen float8 state is not carried over."""
    config = model.config if dtype is None else dataclasses.replace(model.config, dtype=dtype)
    rebuilt = build_abstract(family, with_kernels(config, attention, fp8, residual_dtype, gelu))
    params.set_params(rebuilt, params.flat_params(model), f"the {family} model's parameters")
    return rebuilt


def load_model(folder: str | os.PathLike, expect_family: str | None = None, dtype: str | None = None,
               attention: str | None = None, fp8: bool | None = None, residual_dtype: str | None = None,
               gelu: str | None = None) -> nnx.Module:
    """Builds the model stored in `folder` with its parameters; `dtype` overrides the compute
    dtype, the others the vision encoders' speed choices (see `with_kernels`)."""
    stored = read(folder)
    if expect_family and stored.family != expect_family:
        raise ValueError(f"{folder} holds a {stored.family} model, not {expect_family}")
    config = stored.config if dtype is None else dataclasses.replace(stored.config, dtype=dtype)
    config = with_kernels(config, attention, fp8, residual_dtype, gelu)
    model = build_abstract(stored.family, config)
    params.set_params(model, stored.params, f"{folder}/params")
    return model
