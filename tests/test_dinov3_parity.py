"""DINOv3 ViT in Flax vs transformers' DINOv3ViTModel (the PyTorch reference), through the converters.

Covers the transformers folder and the original facebookresearch/dinov3 `.pth` layout
(fused qkv with a key-bias mask, RoPE periods buffer, storage tokens, the SAT-493M
ViT-L's training-only local_cls_norm), square and non-square inputs, GELU and SwiGLU
MLPs, exact round trips in both formats, the command-line converters, and (slow) a
full-size ViT-L/16.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_safetensors
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from conftest import check_close, randomize_, record, to_nhwc
from convert import rules as R
from convert.dinov3_formats import HfDinov3Format
from convert.to_flax import convert_to_flax
from convert.to_torch import convert_to_torch
from mmovseg_jax.models import dinov3, storage
from mmovseg_jax.models import params as P

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
            num_register_tokens=4, patch_size=16, image_size=64, layer_norm_eps=1e-5)
TINY_SWIGLU = dict(TINY, use_gated_mlp=True, hidden_act="silu", intermediate_size=96, key_bias=True)
SIZES = [(64, 64), (48, 80)]  # native 4x4 grid, and a non-square 3x5 grid


def hf_dinov3(seed: int = 0, **config) -> DINOv3ViTModel:
    """transformers DINOv3ViTModel, eager attention, every parameter random and non-trivial."""
    cfg = DINOv3ViTConfig(**config)
    cfg._attn_implementation = "eager"
    model = randomize_(DINOv3ViTModel(cfg), seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):  # LayerScale: far from 0 and 1, per channel
                p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_reference(hf: DINOv3ViTModel, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states after each block, and the final normed output."""
    out = hf(pixel_values=x, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == hf.config.num_hidden_layers + 1  # embeddings, then one per block
    return list(hs[1:]), out.last_hidden_state


def compare(name: str, model: dinov3.Model, hf: DINOv3ViTModel, size, seed: int = 0, batch: int = 2) -> None:
    """Every block raw and through the final norm (CLS, registers, patches), and patch_tokens."""
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    blocks, last = hf_reference(hf, x)
    depth = len(blocks)
    assert float((blocks[-1] - blocks[-2]).abs().max()) > 1e-2  # the blocks really differ
    images = to_nhwc(x)
    pre = 1 + hf.config.num_register_tokens
    tag = f"{name} {size[0]}x{size[1]}"
    for norm in (False, True):
        ours = model(images, tuple(range(depth)), norm=norm)
        for i, out in enumerate(ours):
            ref = hf.norm(blocks[i]) if norm else blocks[i]
            # Raw hidden states grow with depth: the bound is 1e-4 relative to their scale (>= 1).
            tol = 1e-4 if norm else 1e-4 * max(1.0, float(ref.abs().max()))
            t = f"{tag} block{i} {'norm' if norm else 'raw'}"
            check_close(f"{t} cls+registers", out[:, :pre], ref[:, :pre], tol)
            check_close(f"{t} patches", out[:, pre:], ref[:, pre:], tol)
    check_close(f"{tag} final output", model(images)[0], last)
    patches = model.patch_tokens(images, (0, -1))
    assert patches[0].shape == (batch, (size[0] // 16) * (size[1] // 16), hf.config.hidden_size)
    check_close(f"{tag} patch_tokens last", patches[1], last[:, pre:])


def original_state(hf: DINOv3ViTModel, key_bias_garbage: float = 0.0) -> dict[str, torch.Tensor]:
    """The HF model's tensors under facebookresearch/dinov3's names (built independently of convert/)."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    c = hf.config
    d = c.hidden_size
    out = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": sd["embeddings.mask_token"].reshape(1, d),
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "rope_embed.periods": 1.0 / hf.rope_embeddings.inv_freq.clone(),
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
           # The SAT-493M ViT-L's local-crop CLS norm: in the file, unused at inference.
           "local_cls_norm.weight": torch.ones(d) + 0.1, "local_cls_norm.bias": torch.full((d,), 0.2)}
    for i in range(c.num_hidden_layers):
        h, b = f"model.layer.{i}.", f"blocks.{i}."
        att = lambda n, p: sd[f"{h}attention.{n}_proj.{p}"]  # noqa: E731
        out[b + "attn.qkv.weight"] = torch.cat([att("q", "weight"), att("k", "weight"), att("v", "weight")])
        k_bias = att("k", "bias") if c.key_bias else torch.full((d,), key_bias_garbage)
        out[b + "attn.qkv.bias"] = torch.cat([att("q", "bias"), k_bias, att("v", "bias")])
        out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.full((d,), float(c.key_bias)), torch.ones(d)])
        out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = att("o", "weight"), att("o", "bias")
        out[b + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[b + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
        for n in ("norm1", "norm2"):
            out[f"{b}{n}.weight"], out[f"{b}{n}.bias"] = sd[f"{h}{n}.weight"], sd[f"{h}{n}.bias"]
        mlp = ({"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if c.use_gated_mlp
               else {"fc1": "up_proj", "fc2": "down_proj"})
        for ours, theirs in mlp.items():
            for p in ("weight", "bias"):
                out[f"{b}mlp.{ours}.{p}"] = sd[f"{h}mlp.{theirs}.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


def assert_same_tensors(got: dict, want: dict) -> None:
    """Same keys; every tensor the same dtype, shape and bytes."""
    assert set(got) == set(want), f"only in result: {sorted(set(got) - set(want))}; " \
                                  f"only in original: {sorted(set(want) - set(got))}"
    for k in want:
        g = got[k].numpy() if isinstance(got[k], torch.Tensor) else np.asarray(got[k])
        w = want[k].numpy() if isinstance(want[k], torch.Tensor) else np.asarray(want[k])
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
        assert g.tobytes() == w.tobytes(), k


# --------------------------------------------------------------------- parity

@pytest.fixture(scope="module", params=["mlp", "swiglu"])
def hf_folder(request, tmp_path_factory):
    kw = TINY if request.param == "mlp" else TINY_SWIGLU
    hf = hf_dinov3(seed=1 if request.param == "mlp" else 2, **kw)
    tmp = tmp_path_factory.mktemp(f"dinov3_{request.param}")
    hf.save_pretrained(tmp / "hf")
    convert_to_flax(tmp / "hf", tmp / "flax")
    return request.param, hf, tmp


def test_config_from_hf_folder(hf_folder):
    kind, hf, tmp = hf_folder
    cfg = dinov3.load(tmp / "flax").config
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.num_register_tokens, cfg.mlp) == (64, 3, 4, 4, kind)
    assert cfg.num_prefix_tokens == 5 and cfg.layer_norm_eps == 1e-5 and cfg.rope_base == 100.0
    assert cfg.key_bias == (kind == "swiglu") and cfg.query_bias and cfg.value_bias


@pytest.mark.parametrize("size", SIZES, ids=["64x64", "48x80"])
def test_hf_every_block(hf_folder, size):
    kind, hf, tmp = hf_folder
    compare(f"hf {kind}", dinov3.load(tmp / "flax"), hf, size)


def test_rope_matters(hf_folder, monkeypatch):
    """Without the rotary embedding the outputs are far off: the parity above tests RoPE."""
    kind, hf, tmp = hf_folder
    if kind != "mlp":
        pytest.skip("one architecture is enough")
    model = dinov3.load(tmp / "flax")
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(7))
    _, last = hf_reference(hf, x)
    ones = lambda cfg, grid: (np.zeros((grid[0] * grid[1], cfg.head_dim), np.float32),  # noqa: E731
                              np.ones((grid[0] * grid[1], cfg.head_dim), np.float32))
    monkeypatch.setattr(dinov3, "rope_tables", ones)
    gap = float(np.abs(np.asarray(model(to_nhwc(x))[0]) - last.numpy()).max())
    record("dinov3 without RoPE: max |ours - ref| (must be large)", gap, 1e-2)
    assert gap > 1e-2


def test_bf16_close_to_fp32(hf_folder):
    """bfloat16 compute (float32 norms, RoPE and residual stream) stays close to the reference."""
    kind, hf, tmp = hf_folder
    model16 = storage.load_model(tmp / "flax", dtype="bfloat16")
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(15))
    blocks, _ = hf_reference(hf, x)
    for i, out in enumerate(model16(to_nhwc(x), (0, 1, 2))):
        ref = hf.norm(blocks[i]).numpy()
        assert out.dtype == np.float32
        rel = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
        record(f"dinov3 {kind} bf16 block{i} max|bf16-ref|/max|ref|", rel, 3e-2)
        assert 1e-5 < rel < 3e-2  # bf16 really used, and close


def test_rope_tables_match_transformers():
    hf = hf_dinov3(seed=3, **TINY)
    cfg = HfDinov3Format.config_from_hf(hf.config.to_dict())
    for gh, gw in ((4, 4), (3, 5), (7, 2)):
        cos, sin = hf.rope_embeddings(torch.zeros(1, 3, 16 * gh, 16 * gw))
        ours_sin, ours_cos = dinov3.rope_tables(cfg, (gh, gw))
        check_close(f"rope sin {gh}x{gw}", ours_sin, sin, 1e-6)
        check_close(f"rope cos {gh}x{gw}", ours_cos, cos, 1e-6)


@pytest.fixture(scope="module", params=["mlp", "swiglu"])
def original_pth(request, tmp_path_factory):
    kw = TINY if request.param == "mlp" else TINY_SWIGLU
    hf = hf_dinov3(seed=4 if request.param == "mlp" else 5, **kw)
    tmp = tmp_path_factory.mktemp(f"dinov3_pth_{request.param}")
    torch.save(original_state(hf), tmp / "dinov3.pth")
    # No --num-heads: a .pth has no config, the head count comes from the RoPE periods buffer.
    convert_to_flax(tmp / "dinov3.pth", tmp / "flax")
    return request.param, hf, tmp


@pytest.mark.parametrize("size", SIZES, ids=["64x64", "48x80"])
def test_original_pth_every_block(original_pth, size):
    kind, hf, tmp = original_pth
    model = dinov3.load(tmp / "flax")
    assert model.config.num_heads == 4 and model.config.mlp == kind
    assert model.config.key_bias == (kind == "swiglu")
    compare(f"pth {kind}", model, hf, size)


def test_original_pth_keeps_buffers_aside(original_pth):
    _, hf, tmp = original_pth
    extras = storage.read(tmp / "flax").extras
    depth = hf.config.num_hidden_layers
    assert sorted(extras) == sorted(["rope_embed.periods", "local_cls_norm.weight", "local_cls_norm.bias"]
                                    + [f"blocks.{i}.attn.qkv.bias_mask" for i in range(depth)])


# ----------------------------------------------------------------- round trips

def test_hf_round_trip_bit_exact(hf_folder, tmp_path):
    kind, hf, tmp = hf_folder
    convert_to_torch(tmp / "flax", tmp_path / "back")  # default: the source's format (hf)
    assert_same_tensors(load_safetensors(tmp_path / "back" / "model.safetensors"),
                        load_safetensors(tmp / "hf" / "model.safetensors"))
    back = DINOv3ViTModel.from_pretrained(tmp_path / "back")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "use_gated_mlp",
              "hidden_act", "key_bias", "num_register_tokens", "rope_theta", "layerscale_value",
              "pos_embed_rescale", "layer_norm_eps"):
        assert getattr(back.config, k) == getattr(hf.config, k), k


@pytest.mark.parametrize("garbage", [0.0, 0.25], ids=["zero_key_bias", "masked_key_bias"])
def test_original_round_trip_bit_exact(tmp_path, garbage):
    hf = hf_dinov3(seed=6, **TINY)
    state = original_state(hf, key_bias_garbage=garbage)
    torch.save(state, tmp_path / "in.pth")
    convert_to_flax(tmp_path / "in.pth", tmp_path / "flax")
    convert_to_torch(tmp_path / "flax", tmp_path / "out.pth")  # default: the source's format
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    if garbage:
        # The masked key third has no effect and is written back as zeros; all else is exact.
        d = TINY["hidden_size"]
        for i in range(TINY["num_hidden_layers"]):
            key = f"blocks.{i}.attn.qkv.bias"
            assert torch.equal(back[key][d:2 * d], torch.zeros(d))
            state[key][d:2 * d] = 0
    assert_same_tensors(back, state)


def test_cross_format_hf_to_original_and_back(hf_folder, tmp_path):
    """HF -> Flax -> original .pth (buffers generated) -> Flax: the same parameters, and the
    .pth has exactly the original key set (what load_state_dict(strict=True) needs)."""
    kind, hf, tmp = hf_folder
    convert_to_torch(tmp / "flax", tmp_path / "orig.pth", format="original")
    written = torch.load(tmp_path / "orig.pth", weights_only=True)
    want = original_state(hf)
    del want["local_cls_norm.weight"], want["local_cls_norm.bias"]  # the LVD models have none
    assert set(written) == set(want)
    for k in want:
        torch.testing.assert_close(written[k], want[k], rtol=1e-6, atol=0, msg=k)
    convert_to_flax(tmp_path / "orig.pth", tmp_path / "flax2")
    a, b = storage.read(tmp / "flax").params, storage.read(tmp_path / "flax2").params
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # A .pth holds neither the LayerScale init value nor the training image size; the rest agrees.
    c1, c2 = storage.read(tmp / "flax").config, storage.read(tmp_path / "flax2").config
    assert c2 == dinov3.dataclasses.replace(c1, layerscale=1e-5, image_size=224)


def test_cross_format_original_to_hf_loads_in_transformers(original_pth, tmp_path):
    kind, hf, tmp = original_pth
    convert_to_torch(tmp / "flax", tmp_path / "hf", format="hf")
    back = DINOv3ViTModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert_same_tensors(back.state_dict(), hf.state_dict())
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(8))
    check_close(f"original -> hf ({kind}) output", back(pixel_values=x).last_hidden_state,
                hf(pixel_values=x).last_hidden_state, 0.0)


# ------------------------------------------------------------------------ CLI

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_converts_hf_folder_and_pth(tmp_path):
    hf = hf_dinov3(seed=9, **TINY)
    hf.save_pretrained(tmp_path / "hf")
    torch.save(original_state(hf), tmp_path / "d.pth")
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(10))
    _, last = hf_reference(hf, x)
    for src in ("hf", "d.pth"):
        r = run_cli("convert.to_flax", str(tmp_path / src), str(tmp_path / f"flax_{src}"))
        assert r.returncode == 0, r.stderr
        check_close(f"cli {src} final output", dinov3.load(tmp_path / f"flax_{src}")(to_nhwc(x))[0], last)
    r = run_cli("convert.to_torch", str(tmp_path / "flax_hf"), str(tmp_path / "o.pth"), "--format", "original")
    assert r.returncode == 0, r.stderr
    assert "rope_embed.periods" in torch.load(tmp_path / "o.pth", weights_only=True)


def test_cli_missing_key_is_one_line_exit_2(tmp_path):
    state = original_state(hf_dinov3(seed=11, **TINY))
    del state["blocks.1.ls2.gamma"]
    torch.save(state, tmp_path / "bad.pth")
    r = run_cli("convert.to_flax", str(tmp_path / "bad.pth"), str(tmp_path / "out"))
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing keys (1): blocks.1.ls2.gamma" in errors[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_wrong_rope_periods_and_bias_mask_are_refused(tmp_path):
    state = original_state(hf_dinov3(seed=12, **TINY))
    bad = dict(state, **{"blocks.2.attn.qkv.bias_mask": torch.ones(3 * 64)})  # differs from block 0's
    torch.save(bad, tmp_path / "mask.pth")
    with pytest.raises(R.ConversionError, match=r"buffer blocks\.2\.attn\.qkv\.bias_mask"):
        convert_to_flax(tmp_path / "mask.pth", tmp_path / "out")
    bad = dict(state, **{"rope_embed.periods": torch.tensor([1.0, 3.0, 2.0, 5.0])})
    torch.save(bad, tmp_path / "rope.pth")
    with pytest.raises(R.ConversionError, match="rope_embed.periods"):
        convert_to_flax(tmp_path / "rope.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_variants_match_the_release():
    cfg = dinov3.VARIANTS["L/16"]
    assert (cfg.patch_size, cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (16, 1024, 24, 16, 4096)
    assert (cfg.num_register_tokens, cfg.num_prefix_tokens, cfg.mlp, cfg.key_bias) == (4, 5, "mlp", False)
    assert (dinov3.VARIANTS["S/16"].width, dinov3.VARIANTS["B/16"].width) == (384, 768)
    shapes = P.param_shapes_of(storage.build_abstract("dinov3", cfg))
    millions = sum(math.prod(s) for s, _ in shapes.values()) / 1e6
    assert 303 < millions < 305, millions  # DINOv3 ViT-L/16: 0.3 B parameters


# ------------------------------------------------------------------- real size

@pytest.mark.slow
def test_real_size_vit_l16():
    """Full ViT-L/16 (random weights), all 24 blocks, 64x64 and a non-square 96x64 input."""
    kw = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              num_register_tokens=4, patch_size=16, image_size=224, layer_norm_eps=1e-5)
    hf = hf_dinov3(seed=13, **kw)
    cfg = HfDinov3Format.config_from_hf(hf.config.to_dict())
    assert cfg == dinov3.dataclasses.replace(dinov3.VARIANTS["L/16"], layerscale=1.0)
    state = {k.removeprefix("model."): v.numpy() for k, v in hf.state_dict().items()}
    expected = P.param_shapes_of(storage.build_abstract("dinov3", cfg))
    flat, _ = R.apply_to_flax(HfDinov3Format.rules(cfg, HfDinov3Format.style(state)), state, expected,
                              HfDinov3Format.auxiliary, "ViT-L/16")
    model = dinov3.Model(cfg)
    P.set_params(model, flat)
    for size in ((64, 64), (96, 64)):
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(14))
        blocks, last = hf_reference(hf, x)
        ours = model.patch_tokens(to_nhwc(x), tuple(range(24)))
        for i in range(24):
            check_close(f"ViT-L/16 {size[0]}x{size[1]} block{i} patch tokens (normed)", ours[i],
                        hf.norm(blocks[i])[:, 5:])
        check_close(f"ViT-L/16 {size[0]}x{size[1]} final output", model(to_nhwc(x))[0], last)
