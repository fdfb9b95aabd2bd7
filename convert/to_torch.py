"""mmovseg-jax Flax folder -> PyTorch checkpoint.

    python -m convert.to_torch SRC OUT --format hf|dino|original|openai|release [--qkv fused|split]

`hf` writes a transformers folder (config.json, model.safetensors and, for CLIP, the
tokenizer files) that `CLIPModel.from_pretrained(OUT)` / `ViTModel.from_pretrained(OUT)`
loads (`DINOv3ViTModel` for DINOv3 models); `dino`, `original` (DINOv3) and `openai` write a
state dict `.pth` in the original repositories' naming; `release` writes a full MM-OVSeg model as the authors' `{"model": state_dict}`. Converting back to the format a model came from restores its key naming,
tensor dtypes and the extra tensors kept aside, so the round trip is exact.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from convert import rules as R
from convert.clip_formats import HfClipFormat, OpenAiClipFormat
from convert.dinov3_formats import Dinov3Format, HfDinov3Format
from convert.release_format import ReleaseFormat
from convert.torch_io import log, write_state_dict
from convert.vit_formats import DinoFormat, HfVitFormat
from mmovseg_jax.models import storage, tokenizer

TARGETS = {("dino", "hf"): HfVitFormat, ("dino", "dino"): DinoFormat,
           ("clip", "hf"): HfClipFormat, ("clip", "openai"): OpenAiClipFormat,
           ("mmovseg", "release"): ReleaseFormat,
           ("dinov3", "hf"): HfDinov3Format, ("dinov3", "original"): Dinov3Format}
DEFAULT_TARGET = {"dino": "dino", "hf_vit": "hf", "hf_clip": "hf", "openai_clip": "openai",
                  "mmovseg_release": "release", "hf_dinov3": "hf", "dinov3": "original"}


def _write_hf_folder(out: Path, fmt, config, state, dtypes, tokenizer_src: Path | None) -> Path:
    from transformers import CLIPConfig, DINOv3ViTConfig, ViTConfig

    config_class = {HfClipFormat: CLIPConfig, HfDinov3Format: DINOv3ViTConfig}.get(fmt, ViTConfig)
    hf_config = config_class(**fmt.hf_config(config))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_config.save_pretrained(staging)
        write_state_dict(state, staging / "model.safetensors", dtypes)
        if tokenizer_src is not None:
            for f in tokenizer.tokenizer_files(tokenizer_src):
                shutil.copyfile(f, staging / f.name)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def convert_to_torch(src: str | os.PathLike, out: str | os.PathLike, format: str | None = None,
                     qkv: str | None = None) -> Path:
    """Writes the model in folder `src` as a PyTorch checkpoint at `out`; returns `out`.

    format: "hf", "dino" (DINO models), "original" (DINOv3 models), "openai" (CLIP models) or
    "release" (full MM-OVSeg models); default: the source's.
    qkv: "fused" or "split" attention weights for the openai format (default: the source's).
    """
    stored = storage.read(src)
    source_format = stored.source.get("format")
    format = format or DEFAULT_TARGET.get(source_format) or ("release" if stored.family == "mmovseg" else None)
    fmt = TARGETS.get((stored.family, format))
    if fmt is None:
        choices = sorted(t for fam, t in TARGETS if fam == stored.family)
        raise R.ConversionError(f"{src}: a {stored.family} model can be written as {choices}, not {format!r}")
    same = fmt.name == source_format
    style = dict(stored.source.get("style", {})) if same else {}
    if qkv:
        if fmt is not OpenAiClipFormat:
            raise R.ConversionError("--qkv applies only to --format openai")
        style["qkv"] = qkv
    state = R.apply_to_torch(fmt.rules(stored.config, style), stored.params)
    dtypes = {}
    if same:
        state.update(stored.extras)
        dtypes = {k: v for k, v in stored.source.get("dtypes", {}).items() if k in state}
    elif stored.extras:
        log(f"left out {len(stored.extras)} tensors of the {source_format} source that {fmt.name} has no "
            f"place for: {', '.join(sorted(stored.extras)[:6])}")
    if hasattr(fmt, "buffers"):  # buffers the source did not bring (the release's shifted-window masks,
        for key, value in fmt.buffers(stored.config).items():  # DINOv3's RoPE periods): computed; kept ones stay
            state.setdefault(key, value)
    out = Path(out)
    if format == "hf":
        result = _write_hf_folder(out, fmt, stored.config, state, dtypes,
                                  Path(src) if stored.family == "clip" else None)
    else:
        result = write_state_dict(state, out, dtypes, wrapper="model" if fmt is ReleaseFormat else None)
    log(f"wrote {result} ({len(state)} tensors, {fmt.name} naming)")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.to_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder written by convert.to_flax")
    parser.add_argument("out", help="output: a folder for --format hf, a .pth file otherwise")
    parser.add_argument("--format", choices=("hf", "dino", "original", "openai", "release"),
                        help="default: the source's format ('original': DINOv3's .pth naming)")
    parser.add_argument("--qkv", choices=("fused", "split"), help="openai format: attention weight layout")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        convert_to_torch(args.src, args.out, args.format, args.qkv)
    except (R.ConversionError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
