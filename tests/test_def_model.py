"""The DEF model's pieces against PyTorch, its switches, and the release converter on a
small model (the full-size proof is tests/test_release_fixture_model.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from conftest import check_close
from convert.to_flax import convert_to_flax
from convert.to_torch import convert_to_torch
from mmovseg_jax import segmentation_losses
from mmovseg_jax.models import aggregation, convs, mmovseg, params, storage, tokenizer

TINY = mmovseg.VARIANTS["tiny"]


@pytest.mark.parametrize("factor", [4, 2, 1, -2])
def test_resample_matches_torch_convs(factor):
    layer = convs.Resample(6, 5, factor, rngs=nnx.Rngs(0))
    k = abs(factor)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 6)).astype(np.float32)
    layer.bias[...] = jnp.asarray(np.random.default_rng(1).standard_normal(5).astype(np.float32))
    kernel, bias = np.array(layer.kernel[...]), np.array(layer.bias[...])
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    if factor > 1:  # ConvTranspose2d weight (in, out, k, k)
        ref = F.conv_transpose2d(xt, torch.from_numpy(kernel.transpose(2, 3, 0, 1).copy()), torch.from_numpy(bias),
                                 stride=k)
    else:  # Conv2d weight (out, in, k, k)
        ref = F.conv2d(xt, torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), torch.from_numpy(bias), stride=k)
    check_close(f"Resample factor {factor} vs torch", layer(jnp.asarray(x)), ref.permute(0, 2, 3, 1))


def test_shifted_window_mask_matches_swin_rule():
    mask = aggregation.shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds one region
    assert set(np.unique(mask[3])) == {0.0, -100.0}


def test_linear_attention_matches_explicit_formula():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 3, 4)).astype(np.float32) for _ in range(3))
    phi = lambda a: np.where(a > 0, a + 1, np.exp(a))
    ref = np.einsum("nlhs,nshd->nlhd", np.einsum("nlhd,nshd->nlhs", phi(q), phi(k)), v)
    ref /= np.einsum("nlhd,nshd->nlh", phi(q), phi(k))[..., None]
    check_close("linear attention", aggregation.linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)),
                ref, tol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    return mmovseg.Model(TINY, rngs=nnx.Rngs(0))


def _inputs(cfg, batch=2, classes=3):
    rng = np.random.default_rng(0)
    rgb = jnp.asarray(rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32))
    sar = jnp.asarray(rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32))
    tokens = jnp.asarray(rng.integers(1, 400, (classes, 1, 8)).astype(np.int32))
    return rgb, sar, tokens


@pytest.mark.parametrize("classes", [1, 3, 7])
def test_class_count_comes_from_the_text(tiny_model, classes):
    rgb, sar, tokens = _inputs(TINY, classes=classes)
    logits = nnx.jit(lambda m, *a: m(*a))(tiny_model, rgb, sar, tokens)
    g = TINY.clip_grid
    assert logits.shape == (2, classes, 4 * g, 4 * g) and bool(jnp.isfinite(logits).all())


def test_sar_changes_the_output_and_rgb_only_has_no_sar_branch(tiny_model):
    rgb, sar, tokens = _inputs(TINY)
    fwd = nnx.jit(lambda m, *a: m(*a))
    assert float(jnp.abs(fwd(tiny_model, rgb, sar, tokens) - fwd(tiny_model, rgb, -sar, tokens)).max()) > 1e-4
    rgb_only = mmovseg.Model(dataclasses.replace(TINY, use_sar=False), rngs=nnx.Rngs(0))
    assert rgb_only.sar_dino is None and not any(k.startswith("sar") for k in params.flat_params(rgb_only))
    assert fwd(rgb_only, rgb, None, tokens).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="SAR"):
        tiny_model(rgb, None, tokens)


def test_plain_head_and_dino_patch16_variants():
    plain = dataclasses.replace(TINY, head=dataclasses.replace(TINY.head, num_layers=0))
    patch16 = dataclasses.replace(TINY, dino=dataclasses.replace(TINY.dino, patch_size=16))
    for cfg in (plain, patch16):
        model = mmovseg.Model(cfg, rngs=nnx.Rngs(0))
        rgb, sar, tokens = _inputs(cfg, batch=1)
        assert model(rgb, sar, tokens).shape == (1, 3, 32, 32)
    assert mmovseg.Model(patch16, rngs=nnx.Rngs(0)).rgb_levels.cost.mode == "same"


def test_class_prompts_reject_empty_and_duplicate_lists():
    assert mmovseg.class_prompts(["water", "tree, forest"], ["a {}"]) == [["a water"], ["a tree"]]
    with pytest.raises(ValueError, match="empty"):
        mmovseg.class_prompts([], ["a {}"])
    with pytest.raises(ValueError, match="duplicate class names: road"):
        mmovseg.class_prompts(["road", "water", "road"], ["a {}"])


@pytest.mark.parametrize("use_sar", [True, False])
def test_release_format_round_trip_on_a_small_model(tmp_path, use_sar):
    """Small model -> release-layout .pth -> Flax: identical parameters and outputs."""
    cfg = dataclasses.replace(TINY, use_sar=use_sar, clip_guidance_blocks=(3, 7),
                              clip=dataclasses.replace(TINY.clip, vision=dataclasses.replace(TINY.clip.vision,
                                                                                             depth=12)))
    model = mmovseg.Model(cfg, rngs=nnx.Rngs(3))
    flat = params.flat_params(model)
    folder = storage.save(tmp_path / "ours", "mmovseg", cfg, flat,
                          files=tokenizer.tokenizer_files(tokenizer.BUNDLED_BPE))
    pth = convert_to_torch(folder, tmp_path / "release.pth")
    state = torch.load(pth, weights_only=True)["model"]
    assert "upsample1.weight" in state and ("dino_sarmodel.pos_embed" in state) == use_sar
    assert "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.0.attn.q_proj_weight" in state
    assert state["sem_seg_head.predictor.transformer.layers.0.swin_block.block_2.attn_mask"].shape == (4, 16, 16)
    back = convert_to_flax(pth, tmp_path / "back", image_size=cfg.image_size)
    restored = storage.read(back)
    assert restored.config.use_sar == use_sar and restored.config.head == cfg.head
    assert sorted(restored.params) == sorted(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(restored.params[key], value, err_msg=key)


def test_release_converter_rejects_a_wrong_window_mask(tmp_path):
    model = mmovseg.Model(TINY, rngs=nnx.Rngs(0))
    folder = storage.save(tmp_path / "ours", "mmovseg", TINY, params.flat_params(model),
                          files=tokenizer.tokenizer_files(tokenizer.BUNDLED_BPE))
    state = torch.load(convert_to_torch(folder, tmp_path / "r.pth"), weights_only=True)["model"]
    key = "sem_seg_head.predictor.transformer.layers.0.swin_block.block_2.attn_mask"
    state[key] = torch.zeros_like(state[key])
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="attn_mask"):
        convert_to_flax(tmp_path / "bad.pth", tmp_path / "out", image_size=TINY.image_size)
    assert not (tmp_path / "out").exists()


def test_segmentation_losses_match_torch():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 6, 5)).astype(np.int64)
    labels[0, :2] = 255
    lt, yt = torch.from_numpy(logits), torch.from_numpy(labels)
    valid = yt != 255
    onehot = F.one_hot(yt.clamp(max=3), 4).permute(0, 3, 1, 2).float() * valid[:, None]
    # the release: ignore pixels are all-zero targets and count in the mean
    release = F.binary_cross_entropy_with_logits(lt, onehot)
    per = F.binary_cross_entropy_with_logits(lt, onehot, reduction="none")
    excluded = (per * valid[:, None]).sum() / (valid.sum() * 4)
    ce = F.cross_entropy(lt, yt, ignore_index=255)
    loss = lambda **kw: segmentation_losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), **kw)
    check_close("BCE, release ignore", loss(kind="bce", release_ignore=True), release, tol=1e-6)
    check_close("BCE, ignore excluded", loss(kind="bce"), excluded, tol=1e-6)
    check_close("CE, ignore excluded", loss(kind="ce"), ce, tol=1e-6)
    all_ignored = segmentation_losses.segmentation_loss(jnp.zeros((1, 2, 3, 3)), jnp.full((1, 3, 3), 255))
    assert float(all_ignored) == 0.0
