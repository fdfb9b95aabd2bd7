"""PyTorch / transformers checkpoint -> mmovseg-jax Flax folder.

    python -m convert.to_flax SRC OUT [--checkpoint-key teacher] [--prefix dino_model.]

SRC is a transformers CLIP, ViT/DINO or DINOv3 folder, an original DINO `.pth` (the MM-OVSeg
release's SAR DINO included), an original DINOv3 `.pth` (e.g. dinov3_vitl16_pretrain_sat493m),
an OpenAI CLIP state dict (fused or split q/k/v), or the
MM-OVSeg release's full-model checkpoint (CLIP + both DINOs + head). The format is detected from the keys. OUT
receives an Orbax checkpoint, `model.json` describing the architecture and, for CLIP,
the tokenizer files. Unknown, missing or mis-shaped keys stop the conversion with a
message listing all of them; nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from convert import rules as R
from convert.clip_formats import HfClipFormat, OpenAiClipFormat
from convert.dinov3_formats import Dinov3Format, HfDinov3Format
from convert.release_format import ReleaseFormat
from convert.torch_io import log, read_source
from convert.vit_formats import DinoFormat, HfVitFormat
from mmovseg_jax.models import params as P
from mmovseg_jax.models import storage, tokenizer

FORMATS = (ReleaseFormat, HfClipFormat, OpenAiClipFormat, HfVitFormat, DinoFormat, HfDinov3Format, Dinov3Format)


def detect_format(keys, where: str):
    """The checkpoint format whose signature keys are present."""
    keys = set(keys)
    found = [f for f in FORMATS if f.detect(keys)]
    if ReleaseFormat in found:  # a full model holds CLIP and DINO keys under its own prefixes
        found = [ReleaseFormat]
    if len(found) != 1:
        sample = ", ".join(sorted(keys)[:8])
        what = "no known checkpoint format" if not found else f"ambiguous formats {[f.name for f in found]}"
        raise R.ConversionError(f"{where}: {what} (known: {', '.join(f.name for f in FORMATS)}); "
                                f"first keys: {sample}")
    return found[0]


def convert_to_flax(src: str | os.PathLike, out: str | os.PathLike, *, checkpoint_key: str | None = None,
                    prefix: str | None = None, num_heads: int | None = None,
                    pos_interpolation: str | None = None, tokenizer_folder: str | os.PathLike | None = None,
                    trust_pickle: bool = False, image_size: int | None = None) -> Path:
    """Converts `src` into the Flax folder `out` and returns its path.

    num_heads: attention heads of a DINO/ViT source without config.json (default width // 64;
    for an original DINOv3 `.pth`, from its RoPE periods buffer; OpenAI CLIP files always
    follow OpenAI's width // 64 rule).
    pos_interpolation: "size" or "dino" for DINO models (default: as the source's code base).
    tokenizer_folder: CLIP tokenizer files to store (default: the source folder's, else
    OpenAI's BPE vocabulary shipped with mmovseg-jax).
    image_size: input tile size of a full MM-OVSeg model (default 384, the release's).
    """
    source = read_source(src, checkpoint_key=checkpoint_key, prefix=prefix, trust_pickle=trust_pickle)
    for note in source.notes:
        log(note)
    fmt = detect_format(source.state, str(src))
    style = fmt.style(source.state)
    try:
        extra = {"image_size": image_size} if fmt is ReleaseFormat and image_size else {}
        config = fmt.infer_config(source.state, source.hf_config, num_heads, pos_interpolation, **extra)
    except KeyError as e:
        raise R.ConversionError(f"{src}: looks like {fmt.name} but lacks key {e.args[0]!r}") from e
    log(f"format {fmt.name} {style or ''}-> {fmt.family} {config}")
    if hasattr(fmt, "check_buffers"):
        fmt.check_buffers(config, source.state, str(src))
    expected = P.param_shapes_of(storage.build_abstract(fmt.family, config))
    flax_params, extras = R.apply_to_flax(fmt.rules(config, style), source.state, expected, fmt.auxiliary,
                                          what=str(src))
    if extras:
        log(f"kept {len(extras)} tensors that are not part of the encoder ({', '.join(sorted(extras)[:4])}"
            f"{', ...' if len(extras) > 4 else ''}) in extras.npz, for converting back")
    files = []
    if fmt.family in ("clip", "mmovseg"):
        tok_dir = tokenizer_folder or (source.folder if source.folder and tokenizer.tokenizer_files(source.folder)
                                       else tokenizer.BUNDLED_BPE)
        files = tokenizer.tokenizer_files(tok_dir)
        if not files:
            raise R.ConversionError(f"{tok_dir}: no tokenizer files ({', '.join(tokenizer.TOKENIZER_FILES)})")
        log(f"tokenizer files from {tok_dir}")
    meta = {"format": fmt.name, "style": style, "path": str(src), "dtypes": source.dtypes,
            "checkpoint_key": checkpoint_key, "prefix": prefix}
    folder = storage.save(out, fmt.family, config, flax_params, meta, extras, files)
    log(f"wrote {folder} ({sum(v.size for v in flax_params.values()) / 1e6:.1f} M parameters)")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.to_flax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint file or transformers folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--checkpoint-key", help="entry of a wrapped checkpoint to take (e.g. teacher, student)")
    parser.add_argument("--prefix", help="take only the keys under this prefix (e.g. dino_model.)")
    parser.add_argument("--num-heads", type=int, help="attention heads of a DINO source without config.json (default width // 64)")
    parser.add_argument("--pos-interpolation", choices=("size", "dino"),
                        help="DINO position-table resizing rule (default: the source code base's)")
    parser.add_argument("--image-size", type=int, help="input tile size of a full MM-OVSeg model (default 384)")
    parser.add_argument("--tokenizer", help="folder of CLIP tokenizer files to store with the model")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects in a .pth (only for files you trust)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        convert_to_flax(args.src, args.out, checkpoint_key=args.checkpoint_key, prefix=args.prefix,
                        num_heads=args.num_heads, pos_interpolation=args.pos_interpolation,
                        tokenizer_folder=args.tokenizer, trust_pickle=args.trust_pickle,
                        image_size=args.image_size)
    except (R.ConversionError, P.ParamMismatchError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
