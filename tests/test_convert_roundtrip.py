"""Exact round trips of the checkpoint converters, with tiny random models.

torch -> Flax -> torch must give back the same keys, dtypes and bits for every source
format; Flax -> torch -> Flax must give back the same parameters for every target
format; transformers folders written by `convert_to_torch(format="hf")` must load in
transformers without missing or unexpected keys and compute what the original did.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_safetensors
from safetensors.numpy import save_file as save_safetensors
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from convert.clip_formats import OpenAiClipFormat
from convert.to_flax import convert_to_flax
from convert.to_torch import convert_to_torch
from convert.vit_formats import DinoFormat
from mmovseg_jax.models import clip, dino
from mmovseg_jax.models import params as P
from mmovseg_jax.models import storage

from reference_naming import hf_clip_to_openai

# ------------------------------------------------------------------- tiny models

VIT_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              image_size=32, patch_size=8, layer_norm_eps=1e-6)
VIT_DEPTH = VIT_KW["num_hidden_layers"]
# Widths of 128 so that OpenAI's rule heads = width // 64 gives the same 2 heads.
CLIP_KW = dict(
    projection_dim=16,
    vision_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                       image_size=32, patch_size=8),
    text_config=dict(vocab_size=100, max_position_embeddings=16, hidden_size=128, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=256, bos_token_id=98, eos_token_id=99,
                     pad_token_id=1))
CLIP_DEPTHS = (2, 1)  # vision, text


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adds noise to every parameter: no LayerNorm scale stays 1, no bias stays 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_vit(seed: int = 0) -> ViTModel:
    torch.manual_seed(seed)
    return perturb(ViTModel(ViTConfig(**VIT_KW)), seed)


def tiny_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    return perturb(CLIPModel(CLIPConfig(**CLIP_KW)), seed)


# ------------------------------------------------------------ naming conversions
# Built independently of convert/*: the published key names, from transformers' ones.

def vit_to_dino(raw: dict, depth: int = VIT_DEPTH) -> dict[str, torch.Tensor]:
    """transformers ViT (on-disk v4 names) -> original DINO torch-hub state dict."""
    t = {k: torch.as_tensor(np.asarray(v)) for k, v in raw.items()}
    out = {"cls_token": t["embeddings.cls_token"], "pos_embed": t["embeddings.position_embeddings"],
           "patch_embed.proj.weight": t["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": t["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": t["layernorm.weight"], "norm.bias": t["layernorm.bias"]}
    assert out["cls_token"].shape == (1, 1, VIT_KW["hidden_size"])
    for i in range(depth):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}norm1.{p}"] = t[f"{h}layernorm_before.{p}"]
            out[f"{b}norm2.{p}"] = t[f"{h}layernorm_after.{p}"]
            out[f"{b}attn.qkv.{p}"] = torch.cat([t[f"{h}attention.attention.{n}.{p}"]
                                                 for n in ("query", "key", "value")])
            out[f"{b}attn.proj.{p}"] = t[f"{h}attention.output.dense.{p}"]
            out[f"{b}mlp.fc1.{p}"] = t[f"{h}intermediate.dense.{p}"]
            out[f"{b}mlp.fc2.{p}"] = t[f"{h}output.dense.{p}"]
    return {k: v.clone() for k, v in out.items()}


def clip_to_openai(hf: dict, qkv: str = "fused", depths=CLIP_DEPTHS) -> dict[str, torch.Tensor]:
    """transformers CLIPModel state dict -> OpenAI CLIP naming (fused or split q/k/v)."""
    return hf_clip_to_openai(hf, qkv, depths)


# -------------------------------------------------------------------- comparing

def as_numpy(t) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def assert_same_tensors(got: dict, want: dict) -> None:
    """Same key set; every tensor with the same dtype, shape and bytes."""
    assert set(got) == set(want), (f"only in result: {sorted(set(got) - set(want))}; "
                                   f"only in original: {sorted(set(want) - set(got))}")
    for k in want:
        g, w = got[k], want[k]
        if isinstance(w, torch.Tensor) and isinstance(g, torch.Tensor):
            assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
        g, w = as_numpy(g), as_numpy(w)
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
        assert g.tobytes() == w.tobytes(), k


def assert_same_params(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert np.array_equal(got[k], want[k]), k


def read_pth(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_back(path: Path) -> dict:
    """A converted-back checkpoint: raw safetensors arrays of a folder, or a .pth dict."""
    return load_safetensors(str(path / "model.safetensors")) if path.is_dir() else read_pth(path)


# --------------------------------------------------------------------- sources

@pytest.fixture(scope="module")
def vit_model() -> ViTModel:
    return tiny_vit(0)


@pytest.fixture(scope="module")
def clip_model() -> CLIPModel:
    return tiny_clip(1)


@pytest.fixture(scope="module")
def vit_hf(vit_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sources") / "vit_hf"
    vit_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_raw(vit_hf) -> dict[str, np.ndarray]:
    raw = load_safetensors(str(vit_hf / "model.safetensors"))
    assert "encoder.layer.0.attention.attention.query.weight" in raw and "pooler.dense.weight" in raw
    return raw


@pytest.fixture(scope="module")
def clip_hf(clip_model, tmp_path_factory) -> Path:
    """A transformers CLIP folder, with the position-id buffers older transformers saved."""
    folder = tmp_path_factory.mktemp("sources") / "clip_hf"
    clip_model.save_pretrained(folder)
    raw = load_safetensors(str(folder / "model.safetensors"))
    raw["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    raw["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_safetensors(raw, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def clip_raw(clip_hf) -> dict[str, np.ndarray]:
    return load_safetensors(str(clip_hf / "model.safetensors"))


@pytest.fixture(scope="module")
def vit_flax(vit_hf, tmp_path_factory) -> Path:
    return convert_to_flax(vit_hf, tmp_path_factory.mktemp("flax") / "vit")


@pytest.fixture(scope="module")
def clip_flax(clip_hf, tmp_path_factory) -> Path:
    return convert_to_flax(clip_hf, tmp_path_factory.mktemp("flax") / "clip")


def _head(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head.mlp.0.weight": torch.randn(48, 32, generator=g), "head.mlp.0.bias": torch.randn(48, generator=g),
            "head.last_layer.weight_g": torch.randn(10, 1, generator=g),
            "head.last_layer.weight_v": torch.randn(10, 48, generator=g)}


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def make_source(name: str, d: Path, vit_model, vit_raw, clip_model, clip_hf, vit_hf):
    """(path to convert, the state dict that converting back must reproduce)."""
    if name == "hf_vit_folder":
        return vit_hf, load_safetensors(str(vit_hf / "model.safetensors"))
    if name == "hf_clip_folder":
        return clip_hf, load_safetensors(str(clip_hf / "model.safetensors"))
    if name == "dino_pth":
        sd = vit_to_dino(vit_raw)
        return _save(sd, d / "dino.pth"), sd
    if name == "dino_pth_with_head":
        sd = {**vit_to_dino(vit_raw), **_head(0)}
        return _save(sd, d / "dino_head.pth"), sd
    if name == "dino_training_checkpoint":
        teacher = {**vit_to_dino(vit_raw), **_head(0)}
        student = {k: v + 1 for k, v in teacher.items()}
        ckpt = {"teacher": {(k if k.startswith("head.") else f"backbone.{k}"): v for k, v in teacher.items()},
                "student": {(f"module.{k}" if k.startswith("head.") else f"module.backbone.{k}"): v
                            for k, v in student.items()},
                "epoch": 10}
        return _save(ckpt, d / "checkpoint.pth"), teacher
    if name == "hf_vit_v5_state_dict":
        sd = {k: v.clone() for k, v in vit_model.state_dict().items()}
        assert "layers.0.attention.q_proj.weight" in sd
        return _save(sd, d / "vit_v5.pth"), sd
    if name == "hf_vit_prefixed":
        g = torch.Generator().manual_seed(3)
        sd = {f"vit.{k}": v.clone() for k, v in vit_model.state_dict().items() if not k.startswith("pooler.")}
        sd |= {"classifier.weight": torch.randn(3, 32, generator=g), "classifier.bias": torch.randn(3, generator=g)}
        return _save(sd, d / "vit_cls.pth"), sd
    if name == "hf_vit_prefixed_v4":
        sd = {f"vit.{k}": torch.from_numpy(v.copy()) for k, v in vit_raw.items() if not k.startswith("pooler.")}
        return _save(sd, d / "vit_cls_v4.pth"), sd
    if name.startswith("openai_"):
        sd = clip_to_openai(clip_model.state_dict(), "split" if name == "openai_split" else "fused")
        if name == "openai_fp16":
            sd = {k: v.half() for k, v in sd.items()}
        return _save(sd, d / f"{name}.pth"), sd
    raise KeyError(name)


SOURCES = ["hf_vit_folder", "hf_clip_folder", "dino_pth", "dino_pth_with_head", "dino_training_checkpoint",
           "hf_vit_v5_state_dict", "hf_vit_prefixed", "hf_vit_prefixed_v4", "openai_fused", "openai_split",
           "openai_fp16"]


@pytest.fixture
def source(request, tmp_path, vit_model, vit_raw, clip_model, clip_hf, vit_hf):
    return make_source(request.param, tmp_path, vit_model, vit_raw, clip_model, clip_hf, vit_hf)


# ------------------------------------------------------- torch -> Flax -> torch

@pytest.mark.parametrize("source", SOURCES, indirect=True)
def test_torch_flax_torch_is_exact(source, tmp_path, request):
    src, original = source
    flax = convert_to_flax(src, tmp_path / "flax")
    # transformers-named sources go back as transformers folders (config.json + model.safetensors),
    # also when they came as a torch.save file; DINO and OpenAI ones as .pth files.
    to_folder = request.node.callspec.params["source"].startswith("hf_")
    back = convert_to_torch(flax, tmp_path / ("back" if to_folder else "back.pth"))
    assert back.is_dir() == to_folder
    assert_same_tensors(read_back(back), original)


def test_fp16_source_is_restored_bit_identical(tmp_path, clip_model):
    sd = {k: v.half() for k, v in clip_to_openai(clip_model.state_dict()).items()}
    torch.save(sd, tmp_path / "fp16.pth")
    flax = convert_to_flax(tmp_path / "fp16.pth", tmp_path / "flax")
    stored = storage.read(flax)
    assert all(v.dtype == np.float32 for v in stored.params.values())  # computed in float32
    assert set(stored.source["dtypes"].values()) == {"float16"}
    back = read_pth(convert_to_torch(flax, tmp_path / "back.pth"))
    assert {v.dtype for v in back.values()} == {torch.float16}
    assert all(torch.equal(back[k].view(torch.int16), sd[k].view(torch.int16)) for k in sd)


def test_dino_head_and_training_checkpoint_keep_head(tmp_path, vit_raw, capsys):
    src, teacher = make_source("dino_training_checkpoint", tmp_path, None, vit_raw, None, None, None)
    flax = convert_to_flax(src, tmp_path / "flax")
    err = capsys.readouterr().err
    assert "took the 'teacher' weights" in err and "extras.npz" in err
    assert set(storage.read(flax).extras) == set(_head(0))
    back = read_pth(convert_to_torch(flax, tmp_path / "back.pth"))
    assert {k for k in back if k.startswith("head.")} == set(_head(0))


def test_independent_namings_give_the_same_params(vit_flax, clip_flax, vit_raw, clip_model, tmp_path):
    """The hand-written DINO / OpenAI state dicts above convert to exactly the parameters that
    transformers' naming converts to: both rule tables agree with the published layouts."""
    torch.save(vit_to_dino(vit_raw), tmp_path / "dino.pth")
    dino_params = storage.read(convert_to_flax(tmp_path / "dino.pth", tmp_path / "dino")).params
    assert_same_params(dino_params, storage.read(vit_flax).params)
    for qkv in ("fused", "split"):
        torch.save(clip_to_openai(clip_model.state_dict(), qkv), tmp_path / f"{qkv}.pth")
        oa = storage.read(convert_to_flax(tmp_path / f"{qkv}.pth", tmp_path / qkv)).params
        assert_same_params(oa, storage.read(clip_flax).params)


# --------------------------------------------------- transformers loads our output

def _no_loading_problems(info: dict) -> None:
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (k, info[k])


def test_hf_vit_folder_loads_in_transformers(vit_model, vit_flax, tmp_path):
    out = convert_to_torch(vit_flax, tmp_path / "vit", format="hf")
    model, info = ViTModel.from_pretrained(out, output_loading_info=True)
    _no_loading_problems(info)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = vit_model(x), model.eval()(x)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def test_hf_clip_folder_loads_in_transformers(clip_model, clip_flax, tmp_path):
    out = convert_to_torch(clip_flax, tmp_path / "clip", format="hf")
    model, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    _no_loading_problems(info)
    model.eval()
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(0, 98, (3, 16), generator=g)
    ids[:, 6] = 99  # eos
    with torch.no_grad():
        for fn, kw in (("get_image_features", dict(pixel_values=x)), ("get_text_features", dict(input_ids=ids))):
            want, got = _features(getattr(clip_model, fn)(**kw)), _features(getattr(model, fn)(**kw))
            assert torch.equal(got, want), fn
    assert torch.equal(model.logit_scale, clip_model.logit_scale)


def test_hf_vit_folder_from_dino_pth_loads_in_transformers(vit_model, vit_raw, tmp_path):
    """A DINO .pth written out as a transformers folder: no pooler there (not in DINO).
    A .pth has no config: the head count (default width // 64, at least 1) is given."""
    torch.save(vit_to_dino(vit_raw), tmp_path / "dino.pth")
    flax = convert_to_flax(tmp_path / "dino.pth", tmp_path / "flax", num_heads=VIT_KW["num_attention_heads"])
    out = convert_to_torch(flax, tmp_path / "vit", format="hf")
    model, info = ViTModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    _no_loading_problems(info)
    assert model.config.layer_norm_eps == 1e-6
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(x).last_hidden_state, vit_model(x).last_hidden_state)


# ------------------------------------------------------- Flax -> torch -> Flax

def random_params(family: str, cfg, seed: int) -> dict[str, np.ndarray]:
    """Random float32 values for every parameter of the model built from `cfg` (its shapes taken
    from the NNX module without initialising it, which would compile every initialiser)."""
    rng = np.random.default_rng(seed)
    shapes = P.param_shapes_of(storage.build_abstract(family, cfg))
    return {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in shapes.items()}


DINO_CFG = dino.Config(patch_size=8, width=64, depth=2, num_heads=1, mlp_dim=128, image_size=32,
                       layer_norm_eps=1e-6, qkv_bias=True, pos_interpolation="dino")
CLIP_CFG = clip.Config(
    vision=clip.VisionConfig(patch_size=8, width=128, depth=1, num_heads=2, mlp_dim=256, image_size=32),
    text=clip.TextConfig(vocab_size=64, context_length=12, width=128, depth=2, num_heads=2, mlp_dim=256,
                         eos_token_id=63, pooling="argmax"),
    embed_dim=16)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("target", ["hf", "dino"])
def test_flax_torch_flax_dino(target, qkv_bias, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(DINO_CFG, qkv_bias=qkv_bias)
    params = random_params("dino", cfg, 0)
    folder = storage.save(tmp_path / "flax", "dino", cfg, params, source={})
    out = convert_to_torch(folder, tmp_path / ("hf" if target == "hf" else "dino.pth"), format=target)
    if target == "dino":
        assert set(read_pth(out)) == {k for r in DinoFormat.rules(cfg, {}) for k in r.torch_keys}
    again = storage.read(convert_to_flax(out, tmp_path / "again"))
    assert_same_params(again.params, params)
    # The transformers code base resizes position tables by size, DINO's by scale factor.
    want = cfg if target == "dino" else dataclasses.replace(cfg, pos_interpolation="size")
    assert again.config == want


@pytest.mark.parametrize("pooling", ["argmax", "eos"])
@pytest.mark.parametrize("target", ["hf", "openai-fused", "openai-split"])
def test_flax_torch_flax_clip(target, pooling, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(CLIP_CFG, text=dataclasses.replace(CLIP_CFG.text, pooling=pooling))
    params = random_params("clip", cfg, 1)
    folder = storage.save(tmp_path / "flax", "clip", cfg, params, source={})
    fmt, _, qkv = target.partition("-")
    out = convert_to_torch(folder, tmp_path / ("hf" if fmt == "hf" else "clip.pth"), format=fmt, qkv=qkv or None)
    if fmt == "openai":
        keys = set(read_pth(out))
        assert keys == {k for r in OpenAiClipFormat.rules(cfg, {"qkv": qkv}) for k in r.torch_keys}
        assert any(k.endswith("in_proj_weight") for k in keys) == (qkv == "fused")
    again = storage.read(convert_to_flax(out, tmp_path / "again"))
    assert_same_params(again.params, params)
    if fmt == "hf" and pooling == "argmax":  # stored as transformers' legacy eos_token_id = 2
        want = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eos_token_id=2))
    elif fmt == "openai":  # OpenAI's files pool at the largest id; eos is the last id
        want = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pooling="argmax"))
    else:
        want = cfg
    assert again.config == want


# ----------------------------------------------------------------- cross-format

def test_hf_clip_to_openai_and_back(clip_flax, clip_model, tmp_path, capsys):
    params = storage.read(clip_flax).params
    for qkv in ("fused", "split"):
        pth = convert_to_torch(clip_flax, tmp_path / f"{qkv}.pth", format="openai", qkv=qkv)
        err = capsys.readouterr().err
        # The position-id buffers of the transformers file have no place in OpenAI's naming.
        assert "left out 2 tensors" in err and "text_model.embeddings.position_ids" in err
        keys = set(read_pth(pth))
        assert not any("position_ids" in k for k in keys)
        assert keys == set(clip_to_openai(clip_model.state_dict(), qkv))
        assert_same_params(storage.read(convert_to_flax(pth, tmp_path / f"{qkv}_flax")).params, params)


def test_hf_vit_to_dino_and_back(vit_flax, vit_raw, tmp_path, capsys):
    pth = convert_to_torch(vit_flax, tmp_path / "dino.pth", format="dino")
    err = capsys.readouterr().err
    assert "left out 2 tensors" in err and "pooler.dense.weight" in err and "pooler.dense.bias" in err
    state = read_pth(pth)
    assert not any(k.startswith("pooler") for k in state)
    assert_same_tensors(state, vit_to_dino(vit_raw))
    assert_same_params(storage.read(convert_to_flax(pth, tmp_path / "flax")).params, storage.read(vit_flax).params)


def test_dino_head_left_out_of_hf_folder(vit_raw, tmp_path, capsys):
    torch.save({**vit_to_dino(vit_raw), **_head(0)}, tmp_path / "dino.pth")
    flax = convert_to_flax(tmp_path / "dino.pth", tmp_path / "flax")
    out = convert_to_torch(flax, tmp_path / "hf", format="hf")
    err = capsys.readouterr().err
    assert "left out 4 tensors" in err and "head.last_layer.weight_g" in err
    assert not any(k.startswith("head.") for k in load_safetensors(str(out / "model.safetensors")))


# --------------------------------------------------------------------- sharded

def test_sharded_folder_converts_like_unsharded(vit_hf, vit_raw, vit_flax, tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((vit_hf / "config.json").read_text())
    keys = sorted(vit_raw)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_safetensors({k: vit_raw[k] for k in ks}, str(sharded / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in vit_raw.values()))},
             "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    got, want = storage.read(convert_to_flax(sharded, tmp_path / "flax")), storage.read(vit_flax)
    assert_same_params(got.params, want.params)
    assert got.config == want.config
    assert set(got.extras) == set(want.extras) == {"pooler.dense.weight", "pooler.dense.bias"}
    back = convert_to_torch(tmp_path / "flax", tmp_path / "back")
    assert_same_tensors(load_safetensors(str(back / "model.safetensors")), vit_raw)


# ------------------------------------------------------ --checkpoint-key, --prefix

def _training_checkpoint(vit_raw, path: Path) -> tuple[dict, dict]:
    teacher = vit_to_dino(vit_raw)
    student = {k: v * 2 + 1 for k, v in teacher.items()}
    torch.save({"student": {f"module.backbone.{k}": v for k, v in student.items()},
                "teacher": {f"backbone.{k}": v for k, v in teacher.items()}, "epoch": 3}, path)
    return teacher, student


@pytest.mark.parametrize("key", [None, "teacher", "student"])
def test_checkpoint_key(key, vit_raw, tmp_path):
    teacher, student = _training_checkpoint(vit_raw, tmp_path / "ckpt.pth")
    flax = convert_to_flax(tmp_path / "ckpt.pth", tmp_path / "flax", checkpoint_key=key)
    back = read_pth(convert_to_torch(flax, tmp_path / "back.pth"))
    assert_same_tensors(back, student if key == "student" else teacher)


def test_prefix_selects_sub_model(vit_raw, clip_model, tmp_path):
    g = torch.Generator().manual_seed(7)
    dino_rgb = vit_to_dino(vit_raw)
    dino_sar = {k: v + 1 for k, v in dino_rgb.items()}
    clip_sd = clip_to_openai(clip_model.state_dict(), "split")
    full = {**{f"dino_model.{k}": v for k, v in dino_rgb.items()},
            **{f"dino_sarmodel.{k}": v for k, v in dino_sar.items()},
            **{f"sem_seg_head.predictor.clip_model.{k}": v for k, v in clip_sd.items()},
            "upsample1.weight": torch.randn(4, 4, generator=g), "dino_down_sample.bias": torch.randn(8, generator=g)}
    torch.save({"model": full}, tmp_path / "release.pth")
    for prefix, want in (("dino_model.", dino_rgb), ("dino_sarmodel.", dino_sar),
                         ("sem_seg_head.predictor.clip_model.", clip_sd)):
        flax = convert_to_flax(tmp_path / "release.pth", tmp_path / prefix, prefix=prefix)
        assert storage.read(flax).source["prefix"] == prefix
        assert_same_tensors(read_pth(convert_to_torch(flax, tmp_path / f"{prefix}pth")), want)
