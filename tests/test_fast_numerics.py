"""The speed options that change results: the tanh GELU and the bfloat16 residual stream.

Both are off by default and are run-time choices (`storage.with_kernels`), not part of a
stored model. The tanh GELU is checked against transformers' PyTorch models with their
MLP activation switched to torch's tanh GELU (an independent reference); the bfloat16
residual stream against the float32 one (close, not equal, and really bfloat16). The
default path's exactness is what the parity tests pin.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.activations import ACT2FN

from conftest import record, to_nhwc, vit_model
from convert.to_flax import convert_to_flax
from mmovseg_jax.models import clip, dino, dinov3, mmovseg, params, storage
from mmovseg_jax.train import def_stage
from test_dino_parity import TINY, compare_blocks
from test_dinov3_parity import TINY as TINY_V3
from test_dinov3_parity import compare as compare_v3
from test_dinov3_parity import hf_dinov3
from test_def_large import _config
from test_fp8 import tiny_cmu_run


def _use_tanh_gelu(hf: torch.nn.Module, blocks: int) -> None:
    """Replaces every exact-GELU module of a transformers model with torch's tanh GELU."""
    exact = type(ACT2FN["gelu"])
    owners = [(hf.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
              for name, m in hf.named_modules() if type(m) is exact]
    assert len(owners) == blocks
    for parent, attribute in owners:
        setattr(parent, attribute, ACT2FN["gelu_pytorch_tanh"])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ tanh GELU

def test_dino_tanh_gelu_matches_transformers_with_tanh_gelu(tmp_path):
    """DINO with gelu="tanh" equals transformers' ViTModel whose MLP activation is torch's
    GELU(approximate="tanh"), every block, CLS and patches; and differs from the exact GELU."""
    hf = vit_model(seed=4, layer_norm_eps=1e-6, **TINY)
    hf.save_pretrained(tmp_path / "hf")
    convert_to_flax(tmp_path / "hf", tmp_path / "flax")
    exact = dino.load(tmp_path / "flax")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    exact_out = exact(to_nhwc(x))[0]
    _use_tanh_gelu(hf, 3)
    tanh = storage.load_model(tmp_path / "flax", gelu="tanh")
    assert tanh.config.gelu == "tanh" and tanh.blocks[0].mlp.activation == "gelu_tanh"
    compare_blocks("dino tanh GELU", tanh, hf, (32, 32))
    gap = float(np.abs(np.asarray(tanh(to_nhwc(x))[0]) - np.asarray(exact_out)).max())
    record("dino tanh vs exact GELU: max |difference| (must be > 0)", gap, 1e-7)
    assert gap > 1e-7


def test_dinov3_tanh_gelu_matches_transformers_with_tanh_gelu(tmp_path):
    hf = hf_dinov3(seed=6, **TINY_V3)
    hf.save_pretrained(tmp_path / "hf")
    convert_to_flax(tmp_path / "hf", tmp_path / "flax")
    _use_tanh_gelu(hf, 3)
    model = storage.load_model(tmp_path / "flax", gelu="tanh")
    assert model.blocks[0].mlp.activation == "gelu_tanh"
    compare_v3("dinov3 tanh GELU", model, hf, (48, 80))


def test_bad_names_are_refused():
    tiny = dict(patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64, image_size=32)
    with pytest.raises(ValueError, match="gelu must be one of"):
        dino.Model(dino.Config(**tiny, gelu="fast"))
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        dino.Model(dino.Config(**tiny, residual_dtype="float16"))
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        dinov3.Config(patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64, residual_dtype="half")
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        clip.VisionTower(clip.VisionConfig(patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64, image_size=32,
                                           residual_dtype="bf16"), 16, rngs=nnx.Rngs(0))


# ------------------------------------------------------- bfloat16 residual stream

@pytest.mark.parametrize("family", ["dino", "dinov3", "clip"])
def test_bf16_residual_close_to_float32_residual(family):
    """bf16 compute with a bfloat16 residual stream against bf16 compute with the float32
    one (same weights): close but not equal, outputs still float32, gradients finite."""
    if family == "dino":
        base = dino.Config(patch_size=8, width=64, depth=3, num_heads=4, mlp_dim=128, image_size=32,
                           dtype="bfloat16")
        build = lambda r: dino.Model(dataclasses.replace(base, residual_dtype=r), rngs=nnx.Rngs(0))  # noqa: E731
        run = lambda m, x: m(x, (0, 2), norm=False)[-1]  # noqa: E731
    elif family == "dinov3":
        base = dinov3.Config(patch_size=8, width=64, depth=3, num_heads=4, mlp_dim=128, num_register_tokens=2,
                             layerscale=0.5, dtype="bfloat16")
        build = lambda r: dinov3.Model(dataclasses.replace(base, residual_dtype=r), rngs=nnx.Rngs(0))  # noqa: E731
        run = lambda m, x: m(x, (0, 2), norm=False)[-1]  # noqa: E731
    else:
        vision = clip.VisionConfig(patch_size=8, width=64, depth=3, num_heads=4, mlp_dim=128, image_size=32)
        text = clip.TextConfig(vocab_size=50, context_length=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                               eos_token_id=49)
        build = lambda r: clip.Model(clip.Config(vision=dataclasses.replace(vision, residual_dtype=r),  # noqa: E731
                                                 text=text, embed_dim=16, dtype="bfloat16"), rngs=nnx.Rngs(0))
        run = lambda m, x: m.encode_image(x, (1,)).blocks[0]  # noqa: E731
    plain, lean = build("float32"), build("bfloat16")
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    if family != "clip":
        tokens = lambda m: m.embed(x)[0] if family == "dinov3" else m.embed(x)  # noqa: E731
        assert tokens(plain).dtype == jnp.float32 and tokens(lean).dtype == jnp.bfloat16
    ref, out = run(plain, x), run(lean, x)
    assert out.dtype == jnp.float32
    rel = _rel(out, ref)
    record(f"{family} bf16 residual vs float32 residual (bf16 compute): max rel", rel, 3e-2)
    assert 1e-5 < rel < 3e-2

    graphdef, state = nnx.split(lean)
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(run(nnx.merge(graphdef, p), x))))(state)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_residual_stream_is_bfloat16_in_the_blocks():
    """The blocks' residual adds run in bfloat16 (not float32 upcast and rounded at the
    end): of the adds between (B, T, D) arrays in the traced program, the position-table
    add (before the cast) is the only float32 one; with the default, all five are."""
    def token_adds(residual: str) -> list[str]:
        cfg = dino.Config(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32,
                          dtype="bfloat16", residual_dtype=residual)
        model = dino.Model(cfg, rngs=nnx.Rngs(0))
        jaxpr = jax.make_jaxpr(lambda x: model(x, (1,), norm=False)[0])(jnp.zeros((2, 32, 32, 3))).jaxpr
        return [e.outvars[0].aval.dtype.name for e in jaxpr.eqns
                if e.primitive.name == "add" and e.outvars[0].aval.shape == (2, 17, 32)]

    assert token_adds("bfloat16") == ["float32"] + ["bfloat16"] * 4
    assert token_adds("float32") == ["float32"] * 5


# --------------------------------------------------- run-time choices, not stored

def test_saved_models_record_the_exact_numerics(tmp_path):
    cfg = dino.Config(patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64, image_size=32, dtype="bfloat16",
                      residual_dtype="bfloat16", gelu="tanh")
    model = dino.Model(cfg, rngs=nnx.Rngs(0))
    folder = storage.save(tmp_path / "enc", "dino", model.config, params.flat_params(model))
    stored = storage.read(folder).config
    assert (stored.residual_dtype, stored.gelu) == ("float32", "exact")
    again = storage.load_model(folder, residual_dtype="bfloat16", gelu="tanh")
    x = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
    np.testing.assert_array_equal(np.asarray(again(x)[0]), np.asarray(model(x)[0]))


def test_with_kernels_reaches_every_vision_encoder_but_keeps_clip_activation():
    cfg = storage.with_kernels(mmovseg.VARIANTS["tiny"], residual_dtype="bfloat16", gelu="tanh")
    assert cfg.dino.residual_dtype == "bfloat16" and cfg.dino.gelu == "tanh"
    assert cfg.clip.vision.residual_dtype == "bfloat16" and cfg.clip.vision.activation == "quick_gelu"
    assert storage.kernel_choices({"attention": "cudnn"}) == {"attention": "cudnn", "fp8": False,
                                                              "residual_dtype": "float32", "gelu": "exact"}


def test_stage_configs_carry_the_choices():
    """config.model.residual_dtype / gelu reach the CMU teacher and student and the DEF
    model's encoders; a CMU step with both on trains and tracks the default's losses."""
    d = _config("configs/def.py", None)
    d.model.update(residual_dtype="bfloat16", gelu="tanh")
    model, _ = def_stage.build_model(d.model)
    assert model.config.dino.residual_dtype == "bfloat16" and model.config.dino.gelu == "tanh"
    assert model.config.clip.vision.residual_dtype == "bfloat16"

    def run(lean: bool) -> np.ndarray:
        losses, _, aligner = tiny_cmu_run(**({"residual_dtype": "bfloat16", "gelu": "tanh"} if lean else {}))
        assert aligner.student.config.gelu == ("tanh" if lean else "exact")
        assert aligner.student.config.residual_dtype == ("bfloat16" if lean else "float32")
        return losses

    exact, lean = run(False), run(True)
    print("CMU losses exact", exact, "bf16 residual + tanh GELU", lean)
    assert np.all(np.isfinite(lean)) and not np.array_equal(exact, lean)
    np.testing.assert_allclose(lean, exact, rtol=0.05)
