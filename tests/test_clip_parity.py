"""CLIP in Flax vs transformers' CLIPModel (the PyTorch reference), through the converter.

Covers the transformers folder path and OpenAI's state-dict naming (fused in_proj_weight,
and the MM-OVSeg release's split q/k/v weights), pooled / per-block / text / logits
outputs, the MaskCLIP-style dense mode against an independent torch reference built from
the HF modules, non-native input sizes, bf16 compute, and real-size ViT-B/16.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import (TINY_CLIP_PROJECTION, TINY_CLIP_TEXT, TINY_CLIP_VISION, check_close, clip_model,
                      record, to_nhwc)
from convert.to_flax import convert_to_flax
from mmovseg_jax.models import clip, params, storage
from mmovseg_jax.models.tokenizer import Tokenizer
from reference_naming import hf_clip_to_openai

NATIVE, OTHER = (32, 32), (48, 40)  # OTHER: non-square, grid 6x5 from the 4x4 table
EOS, BOS = TINY_CLIP_TEXT["eos_token_id"], TINY_CLIP_TEXT["bos_token_id"]
BF16_REL_TOL = 3e-2  # as for DINO: max |bf16 - fp32 reference| / max |reference|


def image_features(hf, x, interp):
    out = hf.get_image_features(pixel_values=x, interpolate_pos_encoding=interp)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def text_features(hf, ids):
    out = hf.get_text_features(input_ids=ids)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def torch_dense(hf, x: torch.Tensor, interp: bool) -> torch.Tensor:
    """Dense CLIP embeddings as the MM-OVSeg release computes them (CAT-Seg's model_vpt.py,
    ResidualAttentionBlock.forward_dense, then ln_post on all tokens and the projection),
    written with the HF model's modules. Returns (B, 1 + N, E), CLS first."""
    vm = hf.vision_model
    hs = vm(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=interp).hidden_states
    x_in = hs[-2]  # the input of the last block (hs[0] is after pre_layrnorm)
    last = vm.encoder.layers[-1]
    y = last.layer_norm1(x_in)
    v = last.self_attn.out_proj(last.self_attn.v_proj(y))
    v = v + x_in[:, :1]  # the block input's CLS token, broadcast to every token
    v = v + last.mlp(last.layer_norm2(v))
    return hf.visual_projection(vm.post_layernorm(v))


def images(size, batch=2, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def token_ids() -> torch.Tensor:
    """(3, 16) ids with the (first) end token at positions 3, 9 and 15."""
    ids = torch.randint(1, BOS, (3, 16), generator=torch.Generator().manual_seed(7))
    ids[:, 0] = BOS
    ids[0, 3:] = EOS  # padded with the end token
    ids[1, 9], ids[1, 10:] = EOS, 0  # padded with zeros
    ids[2, 15] = EOS
    return ids


def check_vision(name, model, hf, size, blocks=True):
    x = images(size)
    interp = tuple(size) != NATIVE
    ours = model.encode_image(to_nhwc(x), tuple(range(model.config.vision.depth)) if blocks else ())
    tag = f"{name} {size[0]}x{size[1]}"
    check_close(f"{tag} pooled image embed", ours.image_embed, image_features(hf, x, interp))
    if blocks:
        hs = hf.vision_model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=interp).hidden_states
        assert len(hs) == len(ours.blocks) + 1
        for i, out in enumerate(ours.blocks):
            check_close(f"{tag} vision block{i}", out, hs[i + 1])


def check_dense(name, model, hf, size):
    x = images(size, seed=1)
    out = model.encode_image(to_nhwc(x), dense=True)
    assert out.image_embed is None
    grid = (size[0] // 8) * (size[1] // 8)
    assert out.dense.shape == (2, 1 + grid, TINY_CLIP_PROJECTION)
    check_close(f"{name} dense {size[0]}x{size[1]}", out.dense, torch_dense(hf, x, tuple(size) != NATIVE))


def check_text(name, model, hf):
    ids = token_ids()
    check_close(f"{name} text embed", model.encode_text(jnp.asarray(ids.numpy())), text_features(hf, ids))


def check_logits(name, model, hf):
    x, ids = images(NATIVE, seed=2), token_ids()
    ref = hf(input_ids=ids, pixel_values=x).logits_per_image
    check_close(f"{name} logits_per_image", model(to_nhwc(x), jnp.asarray(ids.numpy())), ref)


# ------------------------------------------------------------ transformers folder

@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    hf = clip_model(seed=11, vision=TINY_CLIP_VISION, text=TINY_CLIP_TEXT, projection_dim=TINY_CLIP_PROJECTION)
    tmp = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(tmp / "hf")
    convert_to_flax(tmp / "hf", tmp / "flax")
    model = clip.load(tmp / "flax")
    assert model.config.text.pooling == "eos" and model.config.text.eos_token_id == EOS
    return hf, model, tmp / "flax"


@pytest.mark.parametrize("size", [NATIVE, OTHER], ids=["native", "48x40"])
def test_image_pooled_and_every_block(hf_clip, size):
    hf, model, _ = hf_clip
    check_vision("hf_clip", model, hf, size)


def test_text_embeds(hf_clip):
    hf, model, _ = hf_clip
    check_text("hf_clip", model, hf)


def test_logits(hf_clip):
    hf, model, _ = hf_clip
    check_logits("hf_clip", model, hf)


@pytest.mark.parametrize("size", [NATIVE, OTHER], ids=["native", "48x40"])
def test_dense(hf_clip, size):
    hf, model, _ = hf_clip
    check_dense("hf_clip", model, hf, size)


def test_bf16_close_to_fp32_but_not_equal(hf_clip):
    hf, model32, folder = hf_clip
    model16 = storage.load_model(folder, dtype="bfloat16")
    assert model16.config.dtype == "bfloat16"
    x, ids = images(NATIVE, seed=4), token_ids()
    cases = [("image", lambda m: m.encode_image(to_nhwc(x)).image_embed, image_features(hf, x, False)),
             ("dense", lambda m: m.encode_image(to_nhwc(x), dense=True).dense, torch_dense(hf, x, False)),
             ("text", lambda m: m.encode_text(jnp.asarray(ids.numpy())), text_features(hf, ids))]
    for what, run, ref in cases:
        ref = ref.numpy()
        out16, out32 = np.asarray(run(model16)), np.asarray(run(model32))
        assert out16.dtype == np.float32
        rel = float(np.abs(out16 - ref).max() / np.abs(ref).max())
        record(f"clip bf16 {what} max|bf16-ref|/max|ref|", rel, BF16_REL_TOL)
        assert rel < BF16_REL_TOL
        assert float(np.abs(out16 - out32).max()) > 1e-4  # bf16 really is used


# -------------------------------------------------------------- OpenAI naming

def openai_state_dict(hf, qkv: str) -> dict[str, torch.Tensor]:
    """The HF model's tensors under OpenAI CLIP's names; qkv "fused" or "split"."""
    depths = (hf.config.vision_config.num_hidden_layers, hf.config.text_config.num_hidden_layers)
    return hf_clip_to_openai(hf.state_dict(), qkv, depths)


@pytest.mark.parametrize("qkv", ["fused", "split"])
def test_openai_naming(hf_clip, tmp_path, qkv):
    hf, hf_converted, _ = hf_clip
    torch.save(openai_state_dict(hf, qkv), tmp_path / "clip.pt")
    convert_to_flax(tmp_path / "clip.pt", tmp_path / "flax")
    model = clip.load(tmp_path / "flax")
    assert model.config.text.pooling == "argmax"  # OpenAI's rule; eos = vocab - 1 is the largest id
    assert storage.read(tmp_path / "flax").source["style"] == {"qkv": qkv}
    # Same parameters, bit for bit, as from the transformers folder.
    ours, ref = params.flat_params(model), params.flat_params(hf_converted)
    assert sorted(ours) == sorted(ref)
    assert all(np.array_equal(ours[k], ref[k]) for k in ref), [k for k in ref if not np.array_equal(ours[k], ref[k])]
    name = f"openai_{qkv}"
    check_vision(name, model, hf, NATIVE)
    check_text(name, model, hf)
    check_logits(name, model, hf)
    check_dense(name, model, hf, OTHER)


# ----------------------------------------------------------------- real size

@pytest.mark.slow
def test_real_size_clip_b16(tmp_path):
    vision = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  image_size=224, patch_size=16)
    text = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                vocab_size=49408, max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406,
                pad_token_id=49407)
    hf = clip_model(seed=21, vision=vision, text=text, projection_dim=512)
    hf.save_pretrained(tmp_path / "hf")
    convert_to_flax(tmp_path / "hf", tmp_path / "flax")
    model = clip.load(tmp_path / "flax")

    x = images((224, 224), batch=1, seed=5)
    blocks = (3, 7, 11)
    ours = model.encode_image(to_nhwc(x), blocks)
    check_close("real B/16 224 pooled image embed", ours.image_embed, image_features(hf, x, False))
    hs = hf.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
    for i, out in zip(blocks, ours.blocks):
        check_close(f"real B/16 224 vision block{i}", out, hs[i + 1])

    tok = Tokenizer()
    ids = tok(["A photo of a city in the scene", "a photo of a cat", "satellite image of farmland and roads"])
    assert ids.shape == (3, 77) and (ids == tok.eos_token_id).any(axis=1).all()
    check_close("real B/16 text embed (tokenized prompts)", model.encode_text(jnp.asarray(ids)),
                text_features(hf, torch.from_numpy(ids).long()))

    x = images((384, 384), batch=1, seed=6)
    dense = model.encode_image(to_nhwc(x), dense=True).dense
    assert dense.shape == (1, 577, 512)
    check_close("real B/16 dense 384 (pos table 14->24)", dense, torch_dense(hf, x, True))
