"""Bad input gives one clear message naming the problem, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_safetensors
from safetensors.numpy import save_file as save_safetensors
from transformers import CLIPConfig, CLIPModel

from convert.rules import ConversionError
from convert.to_flax import convert_to_flax
from convert.to_torch import convert_to_torch
from mmovseg_jax.models import clip, dino
from mmovseg_jax.models import params as P
from mmovseg_jax.models import storage

REPO = Path(__file__).resolve().parents[1]
WIDTH, DEPTH, MLP, PATCH, GRID = 32, 2, 64, 8, 4


def dino_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete original-DINO (torch hub naming) state dict of a tiny ViT."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, WIDTH), "pos_embed": r(1, 1 + GRID * GRID, WIDTH),
          "patch_embed.proj.weight": r(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": r(WIDTH),
          "norm.weight": r(WIDTH), "norm.bias": r(WIDTH)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for n, shape in (("norm1", (WIDTH,)), ("norm2", (WIDTH,))):
            sd[f"{b}{n}.weight"], sd[f"{b}{n}.bias"] = r(*shape), r(*shape)
        for n, (o, i_) in (("attn.qkv", (3 * WIDTH, WIDTH)), ("attn.proj", (WIDTH, WIDTH)),
                           ("mlp.fc1", (MLP, WIDTH)), ("mlp.fc2", (WIDTH, MLP))):
            sd[f"{b}{n}.weight"], sd[f"{b}{n}.bias"] = r(o, i_), r(o)
    return sd


def made_params(family: str, cfg) -> dict[str, np.ndarray]:
    """Values for every parameter of the model built from `cfg` (shapes from the NNX module)."""
    shapes = P.param_shapes_of(storage.build_abstract(family, cfg))
    return {k: np.full(shape, 0.1, np.float32) for k, (shape, _) in shapes.items()}


def broken_dino_state() -> dict[str, torch.Tensor]:
    sd = dino_state()
    del sd["blocks.1.mlp.fc2.bias"]                      # missing
    sd["blocks.0.attn.relative_bias"] = torch.zeros(4)   # unknown
    sd["blocks.1.attn.proj.weight"] = torch.zeros(WIDTH, WIDTH + 1)  # wrong shape
    return sd


def test_dino_pth_reports_every_problem_at_once(tmp_path):
    torch.save(broken_dino_state(), tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as e:
        convert_to_flax(tmp_path / "bad.pth", tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "bad.pth") in msg
    assert re.search(r"missing keys \(1\): blocks\.1\.mlp\.fc2\.bias", msg), msg
    assert re.search(r"unexpected keys \(1\): blocks\.0\.attn\.relative_bias", msg), msg
    assert "wrong shapes (1): blocks.1.attn.proj.weight (32, 33) (expected blocks.1.attn.proj.weight (32, 32))" in msg
    assert not (tmp_path / "out").exists()


def test_misshaped_fused_qkv_names_the_tensor(tmp_path):
    sd = dino_state()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3 * WIDTH + 1, WIDTH)  # not divisible by 3
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=re.escape(
            "blocks.0.attn.qkv.weight (97, 32) (expected blocks.0.attn.qkv.weight (96, 32))")):
        convert_to_flax(tmp_path / "bad.pth", tmp_path / "out")


def test_hf_clip_folder_with_missing_key(tmp_path):
    cfg = CLIPConfig(projection_dim=8,
                     vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, image_size=16, patch_size=8),
                     text_config=dict(vocab_size=50, max_position_embeddings=8, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, bos_token_id=48,
                                      eos_token_id=49, pad_token_id=1))
    folder = tmp_path / "clip"
    CLIPModel(cfg).save_pretrained(folder)
    raw = load_safetensors(str(folder / "model.safetensors"))
    del raw["text_model.encoder.layers.0.mlp.fc2.bias"]
    save_safetensors(raw, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing keys \(1\): text_model\.encoder\.layers\.0\.mlp\.fc2\.bias"
                       ) as e:
        convert_to_flax(folder, tmp_path / "out")
    assert "unexpected" not in str(e.value) and "wrong shapes" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unknown_format_and_bad_checkpoint_key(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="no known checkpoint format.*encoder.weight"):
        convert_to_flax(tmp_path / "other.pth", tmp_path / "out")
    torch.save({"teacher": dino_state()}, tmp_path / "ckpt.pth")
    with pytest.raises(ConversionError, match=r"no entry 'student' \(top-level keys: \['teacher'\]\)"):
        convert_to_flax(tmp_path / "ckpt.pth", tmp_path / "out", checkpoint_key="student")
    with pytest.raises(ConversionError, match="no key starts with 'dino_model.'"):
        convert_to_flax(tmp_path / "ckpt.pth", tmp_path / "out", prefix="dino_model.")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------- CLIs

def run_cli(module: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _missing_path(tmp_path):
    return tmp_path / "does_not_exist.pth", ["does_not_exist.pth", "no such file"]


def _unknown_keys(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, tmp_path / "unknown.pth")
    return tmp_path / "unknown.pth", ["unknown.pth", "no known checkpoint format", "decoder.bias"]


def _missing_key(tmp_path):
    sd = dino_state()
    del sd["blocks.0.norm2.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    return tmp_path / "missing.pth", ["missing.pth", "missing keys (1): blocks.0.norm2.weight"]


@pytest.mark.parametrize("make", [_missing_path, _unknown_keys, _missing_key], ids=["missing-path", "unknown-keys",
                                                                                 "missing-key"])
def test_to_flax_cli_errors(make, tmp_path):
    src, needles = make(tmp_path)
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert.to_flax", src, out), *needles)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_to_torch_cli_rejects_format_of_other_family(tmp_path):
    cfg = dino.Config(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16)
    folder = storage.save(tmp_path / "dino", "dino", cfg, made_params("dino", cfg), source={})
    out = tmp_path / "out.pth"
    assert_clean_error(run_cli("convert.to_torch", folder, out, "--format", "openai"),
                       "a dino model can be written as ['dino', 'hf'], not 'openai'")
    assert not out.exists()


def test_to_torch_errors_in_process(tmp_path):
    """The same checks without a subprocess, for the other failure modes of to_torch."""
    cfg = dino.Config(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16)
    folder = storage.save(tmp_path / "dino", "dino", cfg, made_params("dino", cfg), source={})
    with pytest.raises(ConversionError, match="--qkv applies only to --format openai"):
        convert_to_torch(folder, tmp_path / "x.pth", format="dino", qkv="split")
    with pytest.raises(FileNotFoundError, match="model.json: not found"):
        convert_to_torch(tmp_path / "nothing", tmp_path / "x.pth", format="dino")
    assert not (tmp_path / "x.pth").exists()


# ----------------------------------------------------------------------- storage

TINY_CLIP = clip.Config(
    vision=clip.VisionConfig(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16),
    text=clip.TextConfig(vocab_size=50, context_length=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                         eos_token_id=49),
    embed_dim=8)


def test_loading_folder_of_other_family(tmp_path):
    folder = storage.save(tmp_path / "clip", "clip", TINY_CLIP, made_params("clip", TINY_CLIP), source={})
    with pytest.raises(ValueError, match="holds a clip model, not dino"):
        dino.load(folder)
    assert isinstance(clip.load(folder), clip.Model)


def test_save_with_missing_param_leaves_nothing(tmp_path):
    cfg = dino.Config(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16)
    params = made_params("dino", cfg)
    del params["blocks.0.mlp.fc2.bias"]
    params["blocks.0.attn.query.kernel"] = np.zeros((32, 31), np.float32)
    with pytest.raises(P.ParamMismatchError) as e:
        storage.save(tmp_path / "out", "dino", cfg, params, source={})
    msg = str(e.value)
    assert "missing 1: blocks.0.mlp.fc2.bias" in msg
    assert "blocks.0.attn.query.kernel: got (32, 31), expected (32, 32)" in msg
    assert list(tmp_path.iterdir()) == []
