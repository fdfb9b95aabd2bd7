"""The MM-OVSeg release's full-model checkpoint (`{"model": state_dict}` of its MMOV).

Key layout (B variant, MMOV.py):

    sem_seg_head.predictor.clip_model.*        OpenAI CLIP, q/k/v_proj_weight split
    dino_model.*, dino_sarmodel.*              original DINO ViTs (RGB, SAR)
    dino_decod_proj1 / dino_decod_proj2 / dino_down_sample      RGB levels 4, 8, 12
    dino_sardecod_proj1 / dino_sardecod_proj2 / dino_sardown_sample   SAR levels
    upsample1, upsample2                       CLIP guidance (ConvTranspose)
    sem_seg_head.predictor.transformer.*       cost embedding, aggregation, decoder

The ViT-L variant (MMOVL14.py) has the same names with CLIP L/14@336 and, under
dino_model. / dino_sarmodel., torch-hub DINOv3 ViT-L/16 modules (cls_token,
storage_tokens, rope_embed.periods, blocks.{i}.attn.qkv, ls1.gamma, ...; mapped by
convert/dinov3_formats.py); its level modules are 2x2 and 4x4 ConvTranspose (levels 8,
16) and a 1x1 conv (level 24), all from 1024 channels. It is told apart by the DINO
keys (no pos_embed); the DINOv3 buffers (RoPE periods, qkv bias masks) are checked
against the architecture like the window masks, and the training-only local_cls_norm
is kept aside for writing back.

The shifted-window attention masks (`...block_2.attn_mask`) are buffers: they are
checked against the masks our model computes and kept aside (so a checkpoint written
back loads with strict=True), never loaded as parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from convert import rules as R
from convert.clip_formats import OpenAiClipFormat
from convert.dinov3_formats import Dinov3Format
from convert.vit_formats import DinoFormat
from mmovseg_jax.models import aggregation, def_head, mmovseg

CLIP = "sem_seg_head.predictor.clip_model."
HEAD = "sem_seg_head.predictor.transformer."
RGB, SAR = "dino_model.", "dino_sarmodel."
LEVELS = {"rgb": ("dino_decod_proj1", "dino_decod_proj2", "dino_down_sample"),
          "sar": ("dino_sardecod_proj1", "dino_sardecod_proj2", "dino_sardown_sample")}


def _under(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _stripped(keys, prefix: str) -> set[str]:
    return {k[len(prefix):] for k in keys if k.startswith(prefix)}


def dino_family_of(keys) -> str:
    """"v3" when the RGB DINO keys are the torch-hub DINOv3's, else "v1"."""
    return "v3" if Dinov3Format.detect(_stripped(keys, RGB)) else "v1"


def _dino_format(family: str):
    return Dinov3Format if family == "v3" else DinoFormat


def release_blocks(depth: int) -> tuple[int, int, int]:
    """The release's DINO levels, 0-based: blocks 4, 8, 12 of 12 (B) and 8, 16, 24 of 24 (L),
    i.e. after a third, two thirds and all of the depth."""
    return (depth // 3 - 1, 2 * depth // 3 - 1, depth - 1)


def _prefixed(rules: list[R.Rule], torch_prefix: str, flax_prefix: str) -> list[R.Rule]:
    return [dataclasses.replace(r, torch_keys=tuple(torch_prefix + k for k in r.torch_keys),
                                flax_keys=tuple(flax_prefix + k for k in r.flax_keys)) for r in rules]


def _resample(torch_prefix: str, flax_prefix: str, factor: int) -> list[R.Rule]:
    """A Resample module <-> ConvTranspose2d (factor > 1) or Conv2d weights."""
    if factor > 1:  # ConvTranspose2d weight (in, out, k, k) <-> kernel (k, k, in, out)
        swap = lambda w: w.transpose(2, 3, 0, 1)
        return [R.Rule((f"{torch_prefix}.weight",), (f"{flax_prefix}.kernel",), lambda xs: [swap(xs[0])],
                       lambda xs: [swap(xs[0])]), R.copy(f"{torch_prefix}.bias", f"{flax_prefix}.bias")]
    return R.conv(torch_prefix, flax_prefix, bias=True)


def _mask_keys(state) -> list[str]:
    return sorted(k for k in state if k.startswith(HEAD) and k.endswith(".attn_mask"))


class ReleaseFormat:
    name = "mmovseg_release"
    family = "mmovseg"

    @staticmethod
    def detect(keys) -> bool:
        keys = set(keys)
        return f"{CLIP}visual.class_embedding" in keys and (
            f"{RGB}pos_embed" in keys or Dinov3Format.detect(_stripped(keys, RGB)))

    @staticmethod
    def style(keys) -> dict:
        return {}

    @staticmethod
    def auxiliary(key: str) -> bool:
        if key.startswith(HEAD) and key.endswith(".attn_mask"):
            return True
        # DINOv3 buffers and its training-only local_cls_norm (checked / kept by Dinov3Format)
        return any(key.startswith(p) and Dinov3Format.auxiliary(key[len(p):]) for p in (RGB, SAR))

    @staticmethod
    def infer_config(state: Mapping[str, np.ndarray], hf_config: dict | None, num_heads: int | None,
                     pos_interpolation: str | None, image_size: int = 384) -> mmovseg.Config:
        clip_cfg = OpenAiClipFormat.infer_config(_under(state, CLIP), None, None, None)
        family = dino_family_of(state)
        if family == "v3":
            dino_cfg = Dinov3Format.infer_config(_under(state, RGB), None, num_heads, pos_interpolation)
        else:
            dino_cfg = DinoFormat.infer_config(_under(state, RGB), None, num_heads, pos_interpolation or "dino")
        w = lambda key: state[HEAD + key].shape
        num_layers = R.numbered(_under(state, HEAD), "layers.{i}.")
        window = 12
        masks = _mask_keys(state)
        if masks:
            window = math.isqrt(state[masks[0]].shape[-1])
        head = def_head.HeadConfig(
            embed_dim=w("guidance_projection.0.weight")[1], hidden_dim=w("conv1.weight")[0],
            num_prompts=w("conv1.weight")[1], num_layers=num_layers,
            window=window, appearance_proj_dim=w("guidance_projection.0.weight")[0],
            text_proj_dim=w("text_guidance_projection.0.weight")[0],
            pad_len=256 if f"{HEAD}layers.0.attention.padding_tokens" in state or not num_layers else 0,
            decoder_dims=(w("Fusiondecoder1.conv.double_conv.0.weight")[0],
                          w("Fusiondecoder2.conv.double_conv.0.weight")[0]),
            guidance_dims=(w("CLIP_decoder_guidance_projection.0.0.weight")[1],
                           w("CLIP_decoder_guidance_projection.1.0.weight")[1]),
            clip_guidance_proj_dims=(w("CLIP_decoder_guidance_projection.0.0.weight")[0],
                                     w("CLIP_decoder_guidance_projection.1.0.weight")[0]),
            dino_guidance_proj_dims=(w("DINO_decoder_guidance_projection.0.0.weight")[0],
                                     w("DINO_decoder_guidance_projection.1.0.weight")[0]))
        templates = mmovseg.Config.templates if head.num_prompts == 1 else None
        if templates is None:
            raise R.ConversionError(f"{head.num_prompts} prompt templates per class: only the release's single "
                                    f"template is supported when converting")
        depth = clip_cfg.vision.depth
        # the release's layer_indexes: [3, 7] for B/16, [7, 15] otherwise
        guidance = (3, 7) if depth == 12 else (7, 15) if depth == 24 else (depth // 3 - 1, 2 * depth // 3 - 1)
        extra = {}
        if family == "v3":
            # MMOVL14.py: CLIP sees the tile at 336 (its own table's size) unless it is B/16;
            # DINO levels from get_intermediate_layers(n=24) indices 7, 15 and -1.
            extra = dict(dino_family="v3", dino_blocks=release_blocks(dino_cfg.depth),
                         clip_image_size=0 if clip_cfg.vision.patch_size == 16 else clip_cfg.vision.image_size)
        return mmovseg.Config(clip=clip_cfg, dino=dino_cfg, head=head, image_size=image_size,
                              use_sar=any(k.startswith(SAR) for k in state), clip_guidance_blocks=guidance,
                              **extra)

    @staticmethod
    def rules(cfg: mmovseg.Config, style: dict) -> list[R.Rule]:
        out = _prefixed(OpenAiClipFormat.rules(cfg.clip, {"qkv": "split"}), CLIP, "clip.")
        dino_format = _dino_format(cfg.dino_family)
        out += _prefixed(dino_format.rules(cfg.dino, {}), RGB, "rgb_dino.")
        out += _resample("upsample1", "clip_guidance_up.0", 2) + _resample("upsample2", "clip_guidance_up.1", 4)
        g, d = cfg.clip_grid, cfg.dino_grid
        factors = (mmovseg._factor(d, 2 * g), mmovseg._factor(d, 4 * g), mmovseg._factor(d, g))
        branches = [("rgb", "rgb_levels")]
        if cfg.use_sar:
            out += _prefixed(dino_format.rules(cfg.dino, {}), SAR, "sar_dino.")
            branches.append(("sar", "sar_levels"))
        for branch, flax in branches:
            for torch_name, flax_name, f in zip(LEVELS[branch], ("level_2g", "level_4g", "cost"), factors):
                out += _resample(torch_name, f"{flax}.{flax_name}", f)
        return out + _prefixed(_head_rules(cfg.head), HEAD, "head.")

    @staticmethod
    def buffers(cfg: mmovseg.Config) -> dict[str, np.ndarray]:
        """The release's non-parameter tensors for this architecture: shifted-window masks
        and, with DINOv3 encoders, their RoPE periods and qkv bias masks."""
        out = {}
        if cfg.dino_family == "v3":
            for prefix in (RGB, SAR) if cfg.use_sar else (RGB,):
                out.update({prefix + k: v for k, v in Dinov3Format.buffers(cfg.dino).items()})
        g = cfg.clip_grid
        window = min(cfg.head.window, g)
        if window == g:  # one window: the release registers no mask
            return out
        mask = aggregation.shifted_window_mask(g, g, window, window // 2)
        out.update({f"{HEAD}layers.{i}.swin_block.block_2.attn_mask": mask.copy() for i in range(cfg.head.num_layers)})
        return out

    @staticmethod
    def check_buffers(cfg: mmovseg.Config, state: Mapping[str, np.ndarray], where: str) -> None:
        """The stored shifted-window masks (and DINOv3 buffers) must equal the ones our model computes."""
        if cfg.dino_family == "v3":
            for prefix in (RGB, SAR) if cfg.use_sar else (RGB,):
                Dinov3Format.check_buffers(cfg.dino, _under(state, prefix), f"{where} ({prefix}*)")
        expected = ReleaseFormat.buffers(cfg)
        for key in _mask_keys(state):
            mine = expected.get(key, np.zeros((0,), np.float32))
            theirs = np.asarray(state[key], np.float32)
            if theirs.shape != mine.shape or not np.array_equal(theirs, mine):
                raise R.ConversionError(f"{where}: buffer {key} {theirs.shape} differs from the shifted-window "
                                        f"mask of a {cfg.clip_grid}x{cfg.clip_grid} map with window "
                                        f"{cfg.head.window} {mine.shape}")


def _head_rules(h: def_head.HeadConfig) -> list[R.Rule]:
    out = [*R.conv("conv1", "clip_cost_embed", bias=True),
           *R.conv("guidance_projection.0", "appearance_proj", bias=True),
           *R.linear("text_guidance_projection.0", "text_proj"),
           *R.conv("head", "classifier", bias=True)]
    if h.use_clip_cost and h.use_dino_cost:
        out += [*R.conv("conv2", "dino_cost_embed", bias=True), *R.conv("fusion_corr", "cost_fusion", bias=True)]
    for i in range(2):
        out += R.conv(f"CLIP_decoder_guidance_projection.{i}.0", f"clip_guidance_proj.{i}", bias=True)
        out += R.conv(f"DINO_decoder_guidance_projection.{i}.0", f"dino_guidance_proj.{i}", bias=True)
        t, f = f"Fusiondecoder{i + 1}", f"decoder{i + 1}"
        out += _resample(f"{t}.up", f"{f}.up", 2)
        out += [*R.conv(f"{t}.conv.double_conv.0", f"{f}.conv.conv1", bias=False),
                *R.layer_norm(f"{t}.conv.double_conv.1", f"{f}.conv.norm1"),
                *R.conv(f"{t}.conv.double_conv.3", f"{f}.conv.conv2", bias=False),
                *R.layer_norm(f"{t}.conv.double_conv.4", f"{f}.conv.norm2")]
    for i in range(h.num_layers):
        t, f = f"layers.{i}", f"layers.{i}"
        for b in ("block_1", "block_2"):
            tb, fb = f"{t}.swin_block.{b}", f"{f}.spatial.{b}"
            out += [*R.layer_norm(f"{tb}.norm1", f"{fb}.norm1"), *R.layer_norm(f"{tb}.norm2", f"{fb}.norm2"),
                    *R.linear(f"{tb}.mlp.fc1", f"{fb}.mlp.fc1"), *R.linear(f"{tb}.mlp.fc2", f"{fb}.mlp.fc2")]
            out += [r for n in ("q", "k", "v", "proj") for r in R.linear(f"{tb}.attn.{n}", f"{fb}.attn.{n}")]
        out += R.layer_norm(f"{t}.swin_block.guidance_norm", f"{f}.spatial.guidance_norm")
        ta, fa = f"{t}.attention", f"{f}.classwise"
        out += [r for n in ("q", "k", "v") for r in R.linear(f"{ta}.attention.{n}", f"{fa}.{n}")]
        out += [*R.linear(f"{ta}.MLP.0", f"{fa}.mlp_in"), *R.linear(f"{ta}.MLP.2", f"{fa}.mlp_out"),
                *R.layer_norm(f"{ta}.norm1", f"{fa}.norm1"), *R.layer_norm(f"{ta}.norm2", f"{fa}.norm2")]
        if h.pad_len:
            out += [R.reshaped(f"{ta}.padding_tokens", f"{fa}.padding_tokens", (1, 1, -1), (-1,)),
                    R.reshaped(f"{ta}.padding_guidance", f"{fa}.padding_guidance", (1, 1, -1), (-1,))]
    return out
