"""The ViT-L DEF model (paper Appendix D, the release's MMOVL14.py): CLIP L/14@336 +
DINOv3 L/16 for RGB and SAR.

Checked on "tiny_v3", a small model with L's structure (DINOv3 encoders, CLIP on a
resized tile, L's level convolutions); the full-size L is only built abstractly. The
release-layout checkpoint of test (c) is made by `release_l_shapes`, written here from
the release's module names (MMOVL14.py, RIPD, OpenAI CLIP, torch-hub DINOv3)
independently of convert/.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from convert.to_flax import convert_to_flax
from convert.to_torch import convert_to_torch
from mmovseg_jax.models import dino as dino_module
from mmovseg_jax.models import mmovseg, params, storage

ROOT = Path(__file__).resolve().parents[1]
TINY_V3 = mmovseg.VARIANTS["tiny_v3"]
CLIP, HEAD = "sem_seg_head.predictor.clip_model.", "sem_seg_head.predictor.transformer."


def _inputs(cfg: mmovseg.Config, batch: int = 2, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    rgb, sar = (jnp.asarray(rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32))
                for _ in range(2))
    tokens = jnp.asarray(rng.integers(1, 400, (classes, 1, 8)).astype(np.int32))
    return rgb, sar, tokens


_forward = nnx.jit(lambda model, rgb, sar, tokens: model(rgb, sar, tokens))


# ------------------------------------------------------------------ (a) structure


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tiny_v3 built by the DEF trainer (def_stage.build_model) with both DINOv3 encoders
    read from a converted-model folder of random weights: (model, those weights, config.model)."""
    from mmovseg_jax.models import dinov3
    from mmovseg_jax.train import def_stage

    tmp_path = tmp_path_factory.mktemp("dinov3")
    shapes = params.param_shapes_of(nnx.eval_shape(lambda: dinov3.Model(TINY_V3.dino, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    weights = {k: (0.1 * rng.standard_normal(shape)).astype(np.float32) for k, (shape, _) in shapes.items()}
    folder = storage.save(tmp_path / "dinov3", "dinov3", TINY_V3.dino, weights)
    m = _config("configs/def.py", "synthetic").model
    m.variant, m.rgb_dino_checkpoint, m.sar_dino_checkpoint = "tiny_v3", str(folder), str(folder)
    model, _ = def_stage.build_model(m)
    return model, weights, m


def test_tiny_v3_has_the_large_structure_and_runs(built):
    cfg = TINY_V3
    assert cfg.dino_family == "v3" and cfg.clip_input_size != cfg.image_size
    assert cfg.clip_grid == cfg.dino_grid == 8
    model = built[0]
    assert model.config == cfg
    # L's level convolutions: 2x2 and 4x4 transposed (levels 8, 16), 1x1 (level 24)
    levels = model.rgb_levels
    assert (levels.level_2g.factor, levels.level_4g.factor, levels.cost.mode) == (2, 4, "same")
    assert levels.level_2g.kernel.shape == (2, 2, cfg.dino.width, cfg.head.guidance_dims[0])
    assert type(model.sar_dino).__name__ == "Model" and model.sar_dino.config.num_register_tokens == 4
    rgb, sar, tokens = _inputs(cfg)
    start = time.perf_counter()
    logits = _forward(model, rgb, sar, tokens)
    print(f"tiny_v3 forward (2 tiles, 3 classes, with compile): {time.perf_counter() - start:.1f} s")
    assert logits.shape == (2, 3, 4 * cfg.clip_grid, 4 * cfg.clip_grid) and bool(jnp.isfinite(logits).all())
    # the SAR branch and the register tokens are wired in
    assert float(jnp.abs(_forward(model, rgb, -sar, tokens) - logits).max()) > 1e-4
    # CLIP sees the tile resized to 112 (bilinear, half-pixel), as F.interpolate does; in
    # float64 (torch's own float32 kernel is 4e-5 off here, its weights rounded to float32)
    clip_in = model.clip_input(rgb)
    ref = torch.nn.functional.interpolate(torch.from_numpy(np.array(rgb, np.float64)).permute(0, 3, 1, 2),
                                          size=(112, 112), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(np.asarray(clip_in), ref.permute(0, 2, 3, 1).numpy(), atol=2e-6, rtol=0)
    # DINO levels are the patch tokens only: registers are not part of the maps
    maps, tokens_all = nnx.jit(lambda m, x: (m.dino_patch_maps(m.rgb_dino, x), m.rgb_dino(x, cfg.dino_blocks)))(
        model, rgb)
    assert [m.shape for m in maps] == [(2, 8, 8, cfg.dino.width)] * 3
    np.testing.assert_array_equal(np.asarray(maps[2]).reshape(2, 64, -1), np.asarray(tokens_all[2][:, 5:]))


def test_config_round_trips_through_json_and_rejects_a_mismatched_family():
    for name in ("B", "L", "tiny", "tiny_v3"):
        cfg = mmovseg.VARIANTS[name]
        assert mmovseg.Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
    old = json.loads(json.dumps(mmovseg.VARIANTS["B"].to_dict()))
    del old["dino_family"], old["clip_image_size"]  # a folder written before the L variant
    assert mmovseg.Config.from_dict(old) == mmovseg.VARIANTS["B"]
    with pytest.raises(ValueError, match="dino_family 'v1' needs"):
        mmovseg.Model(dataclasses.replace(TINY_V3, dino_family="v1"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dino_family must be one of"):
        mmovseg.Model(dataclasses.replace(TINY_V3, dino_family="v2"), rngs=nnx.Rngs(0))


# ---------------------------------------------------- (c) the release's L checkpoint


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes of a release-layout L checkpoint; defaults: the real ViT-L model."""

    clip_width: int = 1024
    clip_depth: int = 24
    clip_patch: int = 14
    clip_grid: int = 24  # CLIP position table 24 x 24 (336 px)
    text_width: int = 768
    text_depth: int = 12
    vocab: int = 49408
    context: int = 77
    embed: int = 768
    dino_width: int = 1024
    dino_depth: int = 24
    dino_heads: int = 16
    dino_mlp: int = 4096
    registers: int = 4
    guidance: tuple[int, int] = (256, 128)  # dino_decod_proj1/2, upsample1/2 outputs
    hidden: int = 128
    appearance: int = 128
    text_proj: int = 128
    decoder: tuple[int, int] = (64, 32)
    clip_proj: tuple[int, int] = (32, 16)
    dino_proj: tuple[int, int] = (32, 16)
    layers: int = 2
    window: int = 12
    head_grid: int = 24


TINY_DIMS = Dims(clip_width=96, clip_depth=4, clip_grid=8, text_width=64, text_depth=2, embed=64,
                 dino_width=128, dino_depth=4, dino_heads=4, dino_mlp=256, guidance=(64, 32), hidden=64,
                 appearance=32, text_proj=32, decoder=(32, 16), clip_proj=(16, 16), dino_proj=(16, 16),
                 window=4, head_grid=8)


def release_l_shapes(d: Dims) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the release's ViT-L MMOV state dict: name -> (shape, kind), kind
    "param", "buffer", "rope" (RoPE periods) or "qkv_bias" (key third zero, as trained)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}

    def add(name, *shape, kind="param"):
        out[name] = (tuple(shape), kind)

    def norm(name, width):
        add(f"{name}.weight", width), add(f"{name}.bias", width)

    def lin(name, d_in, d_out, bias=True):
        add(f"{name}.weight", d_out, d_in)
        if bias:
            add(f"{name}.bias", d_out)

    # OpenAI CLIP, the release's split q/k/v weights
    w, t = d.clip_width, d.text_width
    add(f"{CLIP}visual.conv1.weight", w, 3, d.clip_patch, d.clip_patch)
    add(f"{CLIP}visual.class_embedding", w)
    add(f"{CLIP}visual.positional_embedding", d.clip_grid ** 2 + 1, w)
    norm(f"{CLIP}visual.ln_pre", w), norm(f"{CLIP}visual.ln_post", w)
    add(f"{CLIP}visual.proj", w, d.embed)
    add(f"{CLIP}token_embedding.weight", d.vocab, t)
    add(f"{CLIP}positional_embedding", d.context, t)
    norm(f"{CLIP}ln_final", t)
    add(f"{CLIP}text_projection", t, d.embed)
    add(f"{CLIP}logit_scale")
    for tower, width, depth in (("visual.transformer", w, d.clip_depth), ("transformer", t, d.text_depth)):
        for i in range(depth):
            b = f"{CLIP}{tower}.resblocks.{i}."
            for n in "qkv":
                add(f"{b}attn.{n}_proj_weight", width, width)
            add(f"{b}attn.in_proj_bias", 3 * width)
            lin(f"{b}attn.out_proj", width, width)
            norm(f"{b}ln_1", width), norm(f"{b}ln_2", width)
            lin(f"{b}mlp.c_fc", width, 4 * width), lin(f"{b}mlp.c_proj", 4 * width, width)
    # torch-hub DINOv3 ViT-L/16 (SAT-493M: untie_global_and_local_cls_norm, mask_k_bias)
    D = d.dino_width
    for prefix in ("dino_model.", "dino_sarmodel."):
        add(f"{prefix}cls_token", 1, 1, D)
        add(f"{prefix}storage_tokens", 1, d.registers, D)
        add(f"{prefix}mask_token", 1, D)
        add(f"{prefix}patch_embed.proj.weight", D, 3, 16, 16), add(f"{prefix}patch_embed.proj.bias", D)
        add(f"{prefix}rope_embed.periods", D // d.dino_heads // 4, kind="rope")
        norm(f"{prefix}norm", D), norm(f"{prefix}local_cls_norm", D)
        for i in range(d.dino_depth):
            b = f"{prefix}blocks.{i}."
            norm(f"{b}norm1", D), norm(f"{b}norm2", D)
            add(f"{b}attn.qkv.weight", 3 * D, D)
            add(f"{b}attn.qkv.bias", 3 * D, kind="qkv_bias")
            add(f"{b}attn.qkv.bias_mask", 3 * D, kind="buffer")
            lin(f"{b}attn.proj", D, D)
            add(f"{b}ls1.gamma", D), add(f"{b}ls2.gamma", D)
            lin(f"{b}mlp.fc1", D, d.dino_mlp), lin(f"{b}mlp.fc2", d.dino_mlp, D)
    # MMOVL14: levels and CLIP guidance (ConvTranspose weight: in, out, k, k)
    g2, g4 = d.guidance
    for rgb_or_sar in ("", "sar"):
        add(f"dino_{rgb_or_sar}decod_proj1.weight", D, g2, 2, 2), add(f"dino_{rgb_or_sar}decod_proj1.bias", g2)
        add(f"dino_{rgb_or_sar}decod_proj2.weight", D, g4, 4, 4), add(f"dino_{rgb_or_sar}decod_proj2.bias", g4)
        add(f"dino_{rgb_or_sar}down_sample.weight", d.embed, D, 1, 1)
        add(f"dino_{rgb_or_sar}down_sample.bias", d.embed)
    add("upsample1.weight", w, g2, 2, 2), add("upsample1.bias", g2)
    add("upsample2.weight", w, g4, 4, 4), add("upsample2.bias", g4)
    # RIPD head
    h, a, tp = d.hidden, d.appearance, d.text_proj

    def conv(name, d_in, d_out, k, bias=True):
        add(f"{HEAD}{name}.weight", d_out, d_in, k, k)
        if bias:
            add(f"{HEAD}{name}.bias", d_out)

    conv("conv1", 1, h, 7), conv("conv2", 1, h, 7), conv("fusion_corr", 2 * h, h, 7)
    conv("guidance_projection.0", d.embed, a, 3)
    lin(f"{HEAD}text_guidance_projection.0", d.embed, tp)
    for i in range(2):
        conv(f"CLIP_decoder_guidance_projection.{i}.0", d.guidance[i], d.clip_proj[i], 3)
        conv(f"DINO_decoder_guidance_projection.{i}.0", d.guidance[i], d.dino_proj[i], 3)
        d_in = h if i == 0 else d.decoder[0]
        up = d_in - d.clip_proj[i]
        add(f"{HEAD}Fusiondecoder{i + 1}.up.weight", d_in, up, 2, 2), add(f"{HEAD}Fusiondecoder{i + 1}.up.bias", up)
        dc = f"Fusiondecoder{i + 1}.conv.double_conv"
        conv(f"{dc}.0", d_in + d.dino_proj[i], d.decoder[i], 3, bias=False)
        norm(f"{HEAD}{dc}.1", d.decoder[i])
        conv(f"{dc}.3", d.decoder[i], d.decoder[i], 3, bias=False)
        norm(f"{HEAD}{dc}.4", d.decoder[i])
    conv("head", d.decoder[1], 1, 3)
    windows = (d.head_grid // d.window) ** 2
    for i in range(d.layers):
        b = f"{HEAD}layers.{i}."
        for blk in ("block_1", "block_2"):
            s = f"{b}swin_block.{blk}."
            norm(f"{s}norm1", h), norm(f"{s}norm2", h)
            lin(f"{s}attn.q", h + a, h), lin(f"{s}attn.k", h + a, h), lin(f"{s}attn.v", h, h)
            lin(f"{s}attn.proj", h, h)
            lin(f"{s}mlp.fc1", h, 4 * h), lin(f"{s}mlp.fc2", 4 * h, h)
        add(f"{b}swin_block.block_2.attn_mask", windows, d.window ** 2, d.window ** 2, kind="buffer")
        norm(f"{b}swin_block.guidance_norm", a)
        c = f"{b}attention."
        lin(f"{c}attention.q", h + tp, h), lin(f"{c}attention.k", h + tp, h), lin(f"{c}attention.v", h, h)
        lin(f"{c}MLP.0", h, 4 * h), lin(f"{c}MLP.2", 4 * h, h)
        norm(f"{c}norm1", h), norm(f"{c}norm2", h)
        add(f"{c}padding_tokens", 1, 1, h), add(f"{c}padding_guidance", 1, 1, tp)
    return out


def _swin_mask(grid: int, window: int) -> np.ndarray:
    """The Swin shifted-window attention mask (windows, w*w, w*w): 0 within a region, -100 across."""
    shift = window // 2
    regions = np.zeros((grid, grid))
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (hs, ws) in enumerate((hs, ws) for hs in bounds for ws in bounds):
        regions[hs, ws] = n
    per_window = regions.reshape(grid // window, window, grid // window, window).transpose(0, 2, 1, 3)
    per_window = per_window.reshape(-1, window * window)
    return np.where(per_window[:, None, :] != per_window[:, :, None], -100.0, 0.0).astype(np.float32)


def release_l_state(d: Dims, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the release's ViT-L layout (buffers as the release computes them)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, (shape, kind) in release_l_shapes(d).items():
        if kind == "rope":  # DINOv3's RopePositionEmbedding, base 100, fp32
            head_dim = d.dino_width // d.dino_heads
            state[name] = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
        elif name.endswith("bias_mask"):  # LinearKMaskedBias: the key third masked
            mask = np.ones(shape, np.float32)
            mask[d.dino_width:2 * d.dino_width] = 0
            state[name] = torch.from_numpy(mask)
        elif name.endswith("attn_mask"):
            state[name] = torch.from_numpy(_swin_mask(d.head_grid, d.window))
        else:
            value = np.asarray(0.02 * rng.standard_normal(shape), np.float32)
            if name.endswith((".weight", "gamma")) and len(shape) == 1:
                value += 1.0  # norms and LayerScale near one
            if kind == "qkv_bias":
                value[d.dino_width:2 * d.dino_width] = 0  # never trained (masked); init zero
            state[name] = torch.from_numpy(value)
    return state


def test_release_l_checkpoint_converts_runs_and_converts_back_bit_exact(tmp_path):
    state = release_l_state(TINY_DIMS)
    torch.save({"model": state}, tmp_path / "l14.pth")
    start = time.perf_counter()
    folder = convert_to_flax(tmp_path / "l14.pth", tmp_path / "flax", image_size=128)
    print(f"release L (tiny) -> Flax: {time.perf_counter() - start:.1f} s")
    cfg = storage.read(folder).config
    assert cfg.dino_family == "v3" and cfg.use_sar and cfg.clip_image_size == 112
    assert cfg.dino.num_register_tokens == 4 and cfg.dino.num_heads == 4 and not cfg.dino.key_bias
    assert cfg.dino_blocks == (0, 1, 3) and cfg.clip_guidance_blocks == (0, 1)  # thirds of the depth
    assert cfg.head == TINY_V3.head and cfg.dino == dataclasses.replace(TINY_V3.dino, image_size=224)
    assert (cfg.clip.vision.patch_size, cfg.clip.vision.width, cfg.clip.embed_dim) == (14, 96, 64)

    model = mmovseg.load(folder)
    # the tensors went where they belong
    flat = params.flat_params(model)
    np.testing.assert_array_equal(flat["sar_dino.register_tokens"], state["dino_sarmodel.storage_tokens"][0].numpy())
    np.testing.assert_array_equal(flat["rgb_levels.level_4g.kernel"],
                                  state["dino_decod_proj2.weight"].numpy().transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(flat["sar_levels.cost.kernel"],
                                  state["dino_sardown_sample.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["rgb_dino.blocks.3.ls2.gamma"], state["dino_model.blocks.3.ls2.gamma"].numpy())
    rgb, sar, tokens = _inputs(cfg, batch=1)
    logits = _forward(model, rgb, sar, tokens)
    assert logits.shape == (1, 3, 32, 32) and bool(jnp.isfinite(logits).all())
    # the level kernels computed as the release's ConvTranspose2d on its weights
    maps = nnx.jit(lambda m, x: m.dino_patch_maps(m.rgb_dino, x))(model, rgb)
    ref = torch.nn.functional.conv_transpose2d(torch.from_numpy(np.array(maps[1])).permute(0, 3, 1, 2),
                                               state["dino_decod_proj2.weight"], state["dino_decod_proj2.bias"],
                                               stride=4).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(model.rgb_levels.level_4g(maps[1])), ref, atol=1e-5, rtol=0)

    back = torch.load(convert_to_torch(folder, tmp_path / "back.pth"), weights_only=True)["model"]
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_release_l_checkpoint_with_a_wrong_bias_mask_is_refused(tmp_path):
    state = release_l_state(TINY_DIMS)
    key = "dino_sarmodel.blocks.1.attn.qkv.bias_mask"
    state[key] = torch.ones_like(state[key])  # the key bias unmasked in one SAR block only
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="dino_sarmodel.*bias_mask|bias_mask.*dino_sarmodel"):
        convert_to_flax(tmp_path / "bad.pth", tmp_path / "out", image_size=128)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ (d) the full-size configs


def _config(path: str, arg: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"cfg_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _count(module: nnx.Module) -> int:
    return sum(int(np.prod(shape)) for shape, _ in params.param_shapes_of(module).values())


def test_large_def_configs_name_the_l_variant():
    for setting in ("pie_cloud", "ddhr_sk", "oem_thick", "oem_thin", "pie_clean", "ddhr_sk_to_ch"):
        config = _config("configs/def.py", f"{setting}_large")
        base = _config("configs/def.py", setting)
        assert config.setting == setting and config.model.variant == "L" and base.model.variant == "B"
        assert config.model.require_pretrained and config.total_steps == base.total_steps
    cfg = mmovseg.VARIANTS["L"]
    assert cfg.dino_family == "v3" and cfg.clip_input_size == 336 and cfg.image_size == 384
    assert cfg.clip_grid == cfg.dino_grid == 24 and cfg.head.embed_dim == cfg.clip.embed_dim == 768
    assert cfg.clip_guidance_blocks == (7, 15) and cfg.dino_blocks == (7, 15, 23)
    assert (cfg.dino.width, cfg.dino.depth, cfg.dino.patch_size, cfg.dino.num_register_tokens) == (1024, 24, 16, 4)
    assert sorted(mmovseg.VARIANTS) == ["B", "B_dino16", "L", "tiny", "tiny_v3"]


def test_def_builds_dinov3_encoders_from_converted_folders(built, tmp_path):
    """config.model.rgb/sar_dino_checkpoint of an L-structured variant are DINOv3 folders."""
    from mmovseg_jax.train import def_stage

    model, weights, m = built
    np.testing.assert_array_equal(np.asarray(model.sar_dino.register_tokens[...]), weights["register_tokens"])
    np.testing.assert_array_equal(np.asarray(model.rgb_dino.blocks[3].ls1.gamma[...]), weights["blocks.3.ls1.gamma"])
    v1 = mmovseg.VARIANTS["tiny"].dino
    v1_shapes = params.param_shapes_of(nnx.eval_shape(lambda: dino_module.Model(v1, rngs=nnx.Rngs(0))))
    v1_folder = storage.save(tmp_path / "dino", "dino", v1, {k: np.zeros(s, np.float32)
                                                            for k, (s, _) in v1_shapes.items()})
    m = m.copy_and_resolve_references()
    m.rgb_dino_checkpoint = str(v1_folder)
    with pytest.raises(ValueError, match="holds a dino model, not dinov3"):
        def_stage.build_model(m)


@pytest.mark.slow  # tracing the 1 B-parameter model abstractly takes 15-45 s on a CPU
def test_large_def_config_builds_the_release_sized_model():
    from mmovseg_jax.train import def_stage

    config = _config("configs/def.py", "pie_cloud_large")
    m = config.model.copy_and_resolve_references()
    m.require_pretrained = False
    start = time.perf_counter()
    model = nnx.eval_shape(lambda: def_stage.build_model(m)[0])
    cfg = model.config
    assert cfg.dino_family == "v3" and cfg.dtype == "bfloat16" and cfg.clip_input_size == 336
    assert cfg.clip_grid == cfg.dino_grid == 24 and cfg.head.embed_dim == 768
    ours = _count(model)
    shapes = release_l_shapes(Dims())
    release = sum(int(np.prod(s)) for s, kind in shapes.values() if kind in ("param", "qkv_bias"))
    # not held by us: the masked key bias of each DINOv3 block, the training-only local_cls_norm
    d = Dims()
    dropped = 2 * (d.dino_depth * d.dino_width + 2 * d.dino_width)
    print(f"ViT-L DEF: {ours / 1e6:.2f} M parameters (release layout {release / 1e6:.2f} M, of which "
          f"{dropped} masked key biases / local_cls_norm not held); built abstractly in "
          f"{time.perf_counter() - start:.1f} s")
    assert ours == release - dropped


def test_large_cmu_config_builds_dinov3_teacher_and_student():
    from mmovseg_jax.train import cmu

    config = _config("configs/cmu.py", "large")
    assert config.model.family == "v3" and config.model.variant == "L/16" and tuple(config.blocks) == (7, 15, 23)
    assert config.teacher_required and config.global_batch_size == 8 and config.optimizer.lr == 3e-4
    config.teacher_required = False
    teacher = nnx.eval_shape(lambda: cmu.build_teacher(config))
    aligner = nnx.eval_shape(lambda: cmu.Aligner(teacher.config, len(config.blocks), rngs=nnx.Rngs(1)))
    assert isinstance(teacher, cmu.Dinov3Tokens) and isinstance(aligner.student, cmu.Dinov3Tokens)
    assert teacher.config.width == 1024 and teacher.config.depth == 24 and teacher.config.image_size == 384
    n = _count(teacher)
    d = Dims()
    hub = sum(int(np.prod(s)) for k, (s, kind) in release_l_shapes(d).items()
              if k.startswith("dino_model.") and kind in ("param", "qkv_bias"))
    print(f"CMU large: DINOv3 ViT-L/16 teacher {n / 1e6:.2f} M parameters (torch hub {hub / 1e6:.2f} M)")
    assert n == hub - d.dino_depth * d.dino_width - 2 * d.dino_width
    assert _count(aligner.student) == n


def test_cmu_tokens_drop_the_registers():
    from mmovseg_jax.train import cmu

    cfg = TINY_V3.dino
    student = cmu.Dinov3Tokens(cfg, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32))
    (full,) = super(cmu.Dinov3Tokens, student).__call__(images, (1,))
    (tokens,) = student(images, (1,))
    assert tokens.shape == (1, 1 + 16, cfg.width)
    np.testing.assert_array_equal(np.asarray(tokens[:, 0]), np.asarray(full[:, 0]))
    np.testing.assert_array_equal(np.asarray(tokens[:, 1:]), np.asarray(student.patch_tokens(images, (1,))[0]))


# --------------------------------------------------------- (b) sharded = one device


@pytest.mark.slow
def test_large_structure_sharded_steps_equal_one_device(tmp_path):
    """DEF training of tiny_v3 on the synthetic world: 8 devices (data 2 x fsdp 4, frozen
    DINOv3 encoders split too) log the losses of 1 device."""
    from test_def_train import _losses, _run

    same = ("--config.model.variant=tiny_v3", "--config.total_steps=3", "--config.optimizer.schedule=constant",
            "--config.optimizer.warmup_steps=0")
    start = time.perf_counter()
    _run(tmp_path / "one", *same)
    fsdp = _run(tmp_path / "fsdp", *same, "--config.mesh.fsdp=4", "--config.mesh.shard_frozen=True", devices=8)
    one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "fsdp")
    print(f"tiny_v3 losses 1 device {one}, 8 devices {eight}; {time.perf_counter() - start:.0f} s")
    assert "{'data': 2, 'fsdp': 4}" in fsdp.stdout
    assert len(one) == 3 and one[0] != one[-1]
    np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)
    saved = json.loads((tmp_path / "one" / "model" / "model.json").read_text())
    assert saved["config"]["dino_family"] == "v3" and saved["config"]["clip_image_size"] == 112


@pytest.mark.slow
def test_cmu_trains_a_dinov3_student_sharded_as_on_one_device(tmp_path):
    """CMU with config.model.family=v3 (a small DINOv3 with registers): 8 devices = 1 device,
    and the SAR encoder is exported as a DINOv3 folder that converts to the original .pth."""
    from test_cmu import _metrics
    from test_cmu import _run as run_cmu

    v3 = ("--config.model.family=v3", "--config.total_steps=3", "--config.loss.embedding=dense")
    run_cmu(tmp_path / "one", *v3)
    eight = run_cmu(tmp_path / "eight", *v3, devices=8)
    assert "over 8 cpu devices" in eight.stdout and "num_register_tokens=4" in eight.stdout
    one, many = ([m["loss"] for m in _metrics(tmp_path / w)] for w in ("one", "eight"))
    print(f"CMU DINOv3 losses 1 device {one}, 8 devices {many}")
    assert len(one) == 3 and one[0] != one[-1]
    np.testing.assert_allclose(many, one, atol=1e-5, rtol=0)
    stored = storage.read(tmp_path / "one" / "sar_encoder")
    assert stored.family == "dinov3" and stored.config.width == 64
    pth = convert_to_torch(tmp_path / "one" / "sar_encoder", tmp_path / "sar.pth")
    state = torch.load(pth, weights_only=True)
    assert state["storage_tokens"].shape == (1, 4, 64) and "blocks.1.attn.qkv.bias_mask" in state
