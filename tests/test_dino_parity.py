"""DINO ViT in Flax vs transformers' ViTModel (the PyTorch reference), through the converter.

Covers the transformers folder path and the original DINO `.pth` naming (plain and
wrapped in a teacher/student training checkpoint), the two position-table resizing
rules against torch's own interpolation, bf16 compute, and real-size B/16 and B/8.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TOL, check_close, record, to_nhwc, vit_model
from convert.to_flax import convert_to_flax
from mmovseg_jax.models import dino, layers, storage

TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
            image_size=32, patch_size=8)
NATIVE, OTHER = (32, 32), (48, 40)  # OTHER: non-square, grid 6x5 from the 4x4 table

# bf16 compute: max |bf16 - fp32 reference| / max |reference| must stay below this.
# bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3); a few layers of matmuls in
# bf16 (LayerNorms and the residual stream stay fp32) give about 1e-2.
BF16_REL_TOL = 3e-2


def compare_blocks(name: str, model: dino.Model, hf, size, batch: int = 2, seed: int = 0,
                   blocks=None, tol: float = TOL) -> None:
    """Every requested block, after the final norm and without it, CLS and patch tokens."""
    depth = model.config.depth
    blocks = tuple(range(depth)) if blocks is None else tuple(blocks)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    interp = tuple(size) != (hf.config.image_size,) * 2
    hs = hf(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=interp).hidden_states
    images = to_nhwc(x)
    for norm in (True, False):
        ours = model(images, blocks, norm=norm)
        for i, out in zip(blocks, ours):
            ref = hf.layernorm(hs[i + 1]) if norm else hs[i + 1]
            tag = f"{name} {size[0]}x{size[1]} block{i} {'norm' if norm else 'raw'}"
            check_close(f"{tag} cls", out[:, 0], ref[:, 0], tol)
            check_close(f"{tag} patches", out[:, 1:], ref[:, 1:], tol)


# ------------------------------------------------------------ transformers folder

@pytest.fixture(scope="module", params=[1e-6, 1e-12], ids=["eps1e-6", "eps1e-12"])
def hf_vit(request, tmp_path_factory):
    eps = request.param
    hf = vit_model(seed=1, layer_norm_eps=eps, **TINY)
    tmp = tmp_path_factory.mktemp("vit")
    hf.save_pretrained(tmp / "hf")
    convert_to_flax(tmp / "hf", tmp / "flax")
    return hf, dino.load(tmp / "flax"), tmp / "flax", eps


@pytest.mark.parametrize("size", [NATIVE, OTHER], ids=["native", "48x40"])
def test_hf_vit_every_block(hf_vit, size):
    hf, model, _, eps = hf_vit
    assert model.config.layer_norm_eps == eps
    assert model.config.pos_interpolation == "size"
    compare_blocks(f"hf_vit eps={eps:g}", model, hf, size)


def test_bf16_close_to_fp32_but_not_equal(hf_vit):
    hf, model32, folder, _ = hf_vit
    model16 = storage.load_model(folder, dtype="bfloat16")
    assert model16.config.dtype == "bfloat16"
    x = torch.randn(2, 3, *NATIVE, generator=torch.Generator().manual_seed(3))
    hs = hf(pixel_values=x, output_hidden_states=True).hidden_states
    blocks = tuple(range(model32.config.depth))
    out16 = model16(to_nhwc(x), blocks)
    out32 = model32(to_nhwc(x), blocks)
    for i in blocks:
        ref = hf.layernorm(hs[i + 1]).numpy()
        rel = float(np.abs(np.asarray(out16[i]) - ref).max() / np.abs(ref).max())
        record(f"dino bf16 block{i} max|bf16-ref|/max|ref|", rel, BF16_REL_TOL)
        assert rel < BF16_REL_TOL
        assert out16[i].dtype == np.float32
        # bf16 really is used: its result differs from the fp32 model's.
        assert float(np.abs(np.asarray(out16[i]) - np.asarray(out32[i])).max()) > 1e-4


# ------------------------------------------------------------------ DINO .pth

def dino_state_dict(hf) -> dict[str, torch.Tensor]:
    """The HF model's tensors under the original DINO (torch hub) names."""
    sd = hf.state_dict()
    out = {"cls_token": sd["embeddings.cls_token"],  # (1, 1, D)
           "pos_embed": sd["embeddings.position_embeddings"],  # (1, 1 + N, D)
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    for i in range(hf.config.num_hidden_layers):
        h, d = f"layers.{i}", f"blocks.{i}"
        for p in ("weight", "bias"):
            out[f"{d}.norm1.{p}"] = sd[f"{h}.layernorm_before.{p}"]
            out[f"{d}.norm2.{p}"] = sd[f"{h}.layernorm_after.{p}"]
            out[f"{d}.attn.qkv.{p}"] = torch.cat([sd[f"{h}.attention.{n}_proj.{p}"] for n in "qkv"], 0)
            out[f"{d}.attn.proj.{p}"] = sd[f"{h}.attention.o_proj.{p}"]
            out[f"{d}.mlp.fc1.{p}"] = sd[f"{h}.mlp.fc1.{p}"]
            out[f"{d}.mlp.fc2.{p}"] = sd[f"{h}.mlp.fc2.{p}"]
    assert out["pos_embed"].shape == (1, 1 + (TINY["image_size"] // TINY["patch_size"]) ** 2, TINY["hidden_size"])
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def hf_vit_dino_eps(tmp_path_factory):
    return vit_model(seed=2, layer_norm_eps=1e-6, **TINY)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "teacher_student"])
def test_original_dino_pth(hf_vit_dino_eps, tmp_path, wrapped):
    hf = hf_vit_dino_eps
    state = dino_state_dict(hf)
    if wrapped:
        head = {"head.mlp.0.weight": torch.randn(32, 64), "head.last_layer.weight_g": torch.ones(100, 1)}
        obj = {"teacher": {**{"backbone." + k: v for k, v in state.items()}, **head},
               # Different weights in the student: taking it instead of the teacher fails.
               "student": {**{"module.backbone." + k: v + 0.5 for k, v in state.items()},
                           **{"module." + k: v for k, v in head.items()}},
               "epoch": 100}
    else:
        obj = state
    torch.save(obj, tmp_path / "dino.pth")
    # A .pth has no config; the head count would default to width // 64 = 1: give the HF model's 4.
    convert_to_flax(tmp_path / "dino.pth", tmp_path / "flax", pos_interpolation="size", num_heads=4)
    model = dino.load(tmp_path / "flax")
    assert model.config.layer_norm_eps == 1e-6 and model.config.pos_interpolation == "size"
    assert model.config.num_heads == 4 and model.config.depth == TINY["num_hidden_layers"]
    if wrapped:  # the projection head is kept aside, not dropped and not an error
        assert sorted(storage.read(tmp_path / "flax").extras) == sorted(head)
    for size in (NATIVE, OTHER):
        compare_blocks(f"dino_pth {'wrapped' if wrapped else 'plain'}", model, hf, size)


# ------------------------------------------------------- position-table resizing

GRIDS = [(28, (48, 48)), (14, (24, 24)), (4, (6, 5)), (28, (20, 20)), (8, (5, 3)), (7, (7, 9))]


@pytest.mark.parametrize("n,grid", GRIDS, ids=[f"{n}to{g[0]}x{g[1]}" for n, g in GRIDS])
def test_resize_position_table_matches_torch(n, grid):
    gh, gw = grid
    d = 16
    table = torch.randn(1 + n * n, d, generator=torch.Generator().manual_seed(n * 100 + gh))
    patches = table[1:].reshape(1, n, n, d).permute(0, 3, 1, 2)
    # The original DINO's interpolate_pos_encoding (vision_transformer.py).
    ref_dino = torch.nn.functional.interpolate(patches, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n),
                                               mode="bicubic")
    # transformers' ViT/CLIP interpolate_pos_encoding.
    ref_size = torch.nn.functional.interpolate(patches, size=(gh, gw), mode="bicubic", align_corners=False)
    for mode, ref in (("dino", ref_dino), ("size", ref_size)):
        assert ref.shape == (1, d, gh, gw)
        ref = torch.cat([table[:1], ref.permute(0, 2, 3, 1).reshape(gh * gw, d)], 0)
        ours = layers.resize_position_table(table.numpy(), grid, mode)
        assert np.array_equal(np.asarray(ours[0]), table[0].numpy())  # CLS row untouched
        # torch computes the sampling coordinates and cubic weights in float32, we in float64:
        # the weights differ by up to ~2e-6, so the bound is 1e-5 relative to the table's scale.
        scale = float(table.abs().max())
        check_close(f"pos table {mode} {n}->{gh}x{gw} (table max {scale:.2f})", ours, ref, 1e-5 * scale)
    if (n, grid) == (28, (48, 48)):
        # The MM-OVSeg release case: scale factor 48.1 / 28, and it is not the "size" rule.
        assert (gh + 0.1) / n == pytest.approx(1.717857142857143, abs=1e-15)
        gap = float((ref_dino - ref_size).abs().max())
        record("pos table 28->48: |dino - size| (must be large)", gap, 1e-3)
        assert gap > 1e-3


# ----------------------------------------------------------------- real size

@pytest.mark.slow
@pytest.mark.parametrize("patch", [16, 8], ids=["B16", "B8"])
def test_real_size_vit_b(patch, tmp_path):
    hf = vit_model(seed=3, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, image_size=224, patch_size=patch, layer_norm_eps=1e-6)
    hf.save_pretrained(tmp_path / "hf")
    convert_to_flax(tmp_path / "hf", tmp_path / "flax")
    model = dino.load(tmp_path / "flax")
    depth = 12
    sizes = [(224, 224)] + ([(256, 192)] if patch == 16 else [])
    for size in sizes:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(5))
        interp = size != (224, 224)
        hs = hf(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=interp).hidden_states
        ours = model(to_nhwc(x), tuple(range(depth)), norm=True)
        for i in range(depth):
            check_close(f"real B/{patch} {size[0]}x{size[1]} block{i} norm", ours[i], hf.layernorm(hs[i + 1]))
