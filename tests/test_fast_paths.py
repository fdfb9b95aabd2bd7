"""The exact speed-ups of the encoders and the CMU step compute what the plain forms do.

- PatchEmbed as one matrix multiply over flattened patches equals the strided convolution
  with the same kernel.
- Attention's query/key/value (and key/value) projections as one GEMM over concatenated
  kernels equal the separate layers.
- DINO's `cls_only` (deepest block's output projection and MLP for the leading token rows
  only) gives the CLS token of the full forward pass, values and parameter gradients.
- The CMU train step with `config.cls_shortcut` on equals it off (loss, updated weights).
- Rematerialised blocks (`remat` activation / full / dots) give the same values and
  gradients, and cut the CMU step's compiled activation memory; under "activation" the
  MLP keeps two (rows, hidden) arrays for its backward pass, not 4-6, and gives the plain
  MLP's values and gradients bit for bit.
- The DEF model's and train step's remat (CLIP towers, head blocks) changes no value.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cmu as cmu_configs
from mmovseg_jax.models import dino, dinov3, layers, mmovseg
from mmovseg_jax.train import cmu, def_stage, loop, sharding

def_configs = importlib.import_module("configs.def")  # "def" is a keyword


@pytest.mark.parametrize("dtype,bias,shape", [(jnp.float32, True, (2, 48, 80, 3)), (jnp.bfloat16, False, (1, 32, 32, 3))])
def test_patch_embed_is_the_convolution(dtype, bias, shape):
    embed = layers.PatchEmbed(16, 24, bias=bias, dtype=dtype, rngs=nnx.Rngs(0))
    if bias:  # a non-zero bias, so that adding it is checked too
        embed.proj.bias[...] = jax.random.normal(jax.random.key(3), (24,))
    x = jax.random.normal(jax.random.key(1), shape)
    out, grid = embed(x)
    ref = embed.proj(x)  # the convolution the parameters belong to
    assert grid == (shape[1] // 16, shape[2] // 16) and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref.reshape(out.shape), np.float32),
                               atol=1e-5 if dtype == jnp.float32 else 2e-2, rtol=0)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_fused_projections_equal_the_separate_layers(qkv_bias):
    attn = layers.Attention(32, 4, qkv_bias=qkv_bias, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 7, 32))
    with jax.default_matmul_precision("highest"):
        fused = attn._projections(x, ("query", "key", "value"))
        for y, name in zip(fused, ("query", "key", "value")):
            np.testing.assert_allclose(np.asarray(y), np.asarray(getattr(attn, name)(x)), atol=1e-6, rtol=0)
        k, v = attn._projections(x, ("key", "value"))
        np.testing.assert_allclose(np.asarray(k), np.asarray(attn.key(x)), atol=1e-6, rtol=0)


def _tiny(**kw) -> dino.Config:
    return dino.Config(patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64, image_size=32, **kw)


@pytest.mark.parametrize("blocks,norm", [((0, 2), True), ((-1,), False), ((1,), True)])
def test_cls_only_equals_the_full_forward(blocks, norm):
    model = dino.Model(_tiny(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (3, 32, 40, 3))
    graphdef, params = nnx.split(model)

    def loss(p, cls_only):
        outs = nnx.merge(graphdef, p)(x, blocks, norm=norm, cls_only=cls_only)
        return sum(jnp.sum(jnp.sin(o[:, 0])) for o in outs), outs

    with jax.default_matmul_precision("highest"):
        (full_loss, full), full_grads = jax.value_and_grad(loss, has_aux=True)(params, False)
        (fast_loss, fast), fast_grads = jax.value_and_grad(loss, has_aux=True)(params, True)
    for f, c in zip(full, fast):
        assert c.shape == (3, 1, 32)
        np.testing.assert_allclose(np.asarray(c), np.asarray(f[:, :1]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(fast_loss), float(full_loss), atol=1e-5)
    # float32 sums in another order: judged relative to the largest gradient (some, such as
    # the key bias's, are zero up to rounding)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(full_grads))
    for g_fast, g_full in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(np.asarray(g_fast), np.asarray(g_full), atol=2e-6 * scale, rtol=0)
    # the gradient reaches the deepest block's query (the CLS row's attention is live)
    deepest = max(layers.normalize_block_indices(blocks, 3))
    assert float(jnp.abs(fast_grads["blocks"][deepest]["attn"]["query"]["kernel"][...]).max()) > 0


def _cmu_step(c):
    """(jitted CMU train step, initial state, teacher params, mesh) for config `c`, one device."""
    mesh = sharding.make_mesh(1, 1)
    teacher = cmu.build_teacher(c)
    s = cmu.place(cmu.Aligner(teacher.config, len(c.blocks), rngs=nnx.Rngs(1)), teacher, c, mesh)
    step = cmu.make_train_step(s.aligner_def, s.teacher_def, s.tx, s.lr, c, mesh, s.state_shardings)
    return step, s.state, s.teacher_params, mesh


def _cmu_run(cls_shortcut: bool, steps: int = 2, remat: str = "none"):
    c = cmu_configs.get_config()
    c.cls_shortcut, c.remat = cls_shortcut, remat
    c.loss.embedding, c.loss.symmetric = "cls", True
    c.model.update(width=32, depth=2, num_heads=2, image_size=32)
    c.blocks = (0, 1)
    c.global_batch_size = 4
    step, state, teacher_params, mesh = _cmu_step(c)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = {"rgb": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                 "sar": rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)}
        state, metrics = step(state, teacher_params, sharding.to_global(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, state["params"]


def test_cmu_step_cls_shortcut_changes_nothing():
    with jax.default_matmul_precision("highest"):
        off_losses, off_params = _cmu_run(False)
        on_losses, on_params = _cmu_run(True)
    np.testing.assert_allclose(on_losses, off_losses, atol=1e-5, rtol=0)
    assert off_losses[0] != off_losses[1]
    _assert_same_training(on_params, off_params, atol=1e-5)


def test_cmu_step_with_activation_remat_changes_nothing():
    with jax.default_matmul_precision("highest"):
        plain_losses, plain_params = _cmu_run(True)
        losses, params = _cmu_run(True, remat="activation")
    np.testing.assert_allclose(losses, plain_losses, atol=1e-6, rtol=0)
    assert plain_losses[0] != plain_losses[1]
    _assert_same_training(params, plain_params)


def _zero_gradient(name: str) -> bool:
    """Parameters whose gradient is zero in exact arithmetic: an attention key bias adds
    the same q.b to every key of a query, which softmax ignores; the DEF classifier's
    bias, shared by every class, shifts all logits alike, which softmax cross-entropy
    ignores. What rounding leaves of such a gradient, Adam scales to up to a learning-rate
    step (measured: key biases 1.2e-6 apart after two CMU steps at lr 2.5e-5), so two
    equal computations can move them differently."""
    return name.endswith("['attn']['key']['bias'].value") or name == "['head']['classifier']['bias'].value"


def _assert_same_training(params, plain_params, atol: float = 1e-6) -> None:
    """Trained parameters equal within atol, those without a gradient (`_zero_gradient`) aside."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(plain_params)):
        name = jax.tree_util.keystr(path)
        if not _zero_gradient(name):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0, err_msg=name)


def test_student_remat_refuses_bad_choices():
    c = cmu_configs.get_config()
    c.remat = "activations"
    with pytest.raises(ValueError, match=r"config.remat: 'activations' is not one of none, activation, full, dots"):
        cmu.student_remat(c)
    c.remat = "activation"
    c.model.update(dtype="bfloat16", fp8=True, gelu="tanh")
    with pytest.raises(ValueError, match=r"config.remat = 'activation' with config.model.fp8 = True and "
                                         r"config.model.gelu = 'tanh'"):
        cmu.student_remat(c)
    c.model.gelu = "exact"
    assert cmu.student_remat(c) == "activation"


@pytest.mark.parametrize("family", ["dino", "dinov3"])
def test_remat_keeps_values_and_gradients(family):
    if family == "dino":
        model = dino.Model(_tiny(), rngs=nnx.Rngs(0))
    else:
        model = dinov3.Model(dinov3.Config(patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64,
                                           image_size=32, num_register_tokens=2), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
    graphdef, params = nnx.split(model)

    def loss(p, remat):
        return sum(jnp.sum(jnp.sin(o)) for o in nnx.merge(graphdef, p)(x, (0, 2), remat=remat))

    ref_loss, ref = jax.value_and_grad(loss)(params, "none")
    for policy in ("activation", "full", "dots"):
        value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, policy)
        np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-6)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
            # float32 sums in another order (jitted and rematerialised against eager): within
            # 1e-6 of each gradient's own scale (the DINOv3 ones reach ~100; a 1e-5 absolute
            # bound failed by 4e-6 on a dev machine whose CPU orders them differently)
            r = np.asarray(r)
            np.testing.assert_allclose(np.asarray(g), r, atol=1e-6 * max(1.0, float(np.abs(r).max())), rtol=1e-5)
    with pytest.raises(ValueError, match="remat policy"):
        model(x, (0,), remat="some")


@pytest.mark.parametrize("activation", sorted(layers.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activation_remat_keeps_only_the_activations_input(activation, dtype, capsys):
    """Under remat="activation" the MLP's activation is recomputed from its input (the fc1
    output) in the backward pass: the same values and gradients as plain autodiff, bit
    for bit, eager and jitted, with two saved (rows, hidden) arrays instead of 4-6."""
    mlp = layers.MLP(32, 96, activation, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mlp)
    rng = np.random.default_rng(0)
    x = jnp.asarray(3 * rng.standard_normal((2, 32, 32)), dtype)
    g = jnp.asarray(rng.standard_normal((2, 32, 32)), dtype)

    def forward(policy):
        return lambda p, h: layers.rematted(lambda m, y: m(y), policy)(nnx.merge(graphdef, p), h)

    for wrap in (lambda f: f, jax.jit):
        y, vjp = jax.vjp(wrap(forward("activation")), params, x)
        y_plain, vjp_plain = jax.vjp(wrap(forward("none")), params, x)
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_plain, np.float32))
        for a, b in zip(jax.tree.leaves(vjp(g)), jax.tree.leaves(vjp_plain(g))):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    hidden = f"{'f32' if dtype == jnp.float32 else 'bf16'}[64,96]"
    jax.ad_checkpoint.print_saved_residuals(forward("activation"), params, x)
    ours = capsys.readouterr().out
    jax.ad_checkpoint.print_saved_residuals(forward("none"), params, x)
    plain = capsys.readouterr().out
    # fc1's output (the activation's input) and the activation's output (fc2's kernel
    # gradient needs it whatever the policy); plain autodiff also keeps the activation's
    # intermediates (gelu and quick_gelu: 4 in all, gelu_tanh: 6)
    assert ours.count(hidden) == 2, ours
    assert plain.count(hidden) >= 4, plain
    # the choice holds only while the blocks are traced under the policy
    assert layers.mlp_activation(activation) is layers.ACTIVATIONS[activation]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA's CPU buffer assignment does not show remat's "
                    "saving (even a plain jax.checkpoint chain of matmuls reports more temporary memory there)")
def test_remat_cuts_the_cmu_steps_activation_memory():
    """Compiled temporary memory of the CMU step (dense loss) with the student's blocks
    rematerialised is below the step that keeps every activation (GPU)."""
    def temp_bytes(remat):
        c = cmu_configs.get_config()
        c.remat = remat
        c.model.update(width=64, depth=4, num_heads=2, image_size=64)
        c.blocks = (1, 3)
        c.global_batch_size = 16
        step, state, teacher_params, _ = _cmu_step(c)
        batch = {"rgb": jax.ShapeDtypeStruct((16, 64, 64, 3), jnp.uint8),
                 "sar": jax.ShapeDtypeStruct((16, 64, 64), jnp.uint8)}
        return step.lower(state, teacher_params, batch).compile().memory_analysis().temp_size_in_bytes

    none, full = temp_bytes("none"), temp_bytes("full")
    assert full < 0.8 * none, (full, none)


def _small_def_model() -> mmovseg.Model:
    """mmovseg's "tiny" cut to 2-block encoders at 64 px with one aggregation layer."""
    cfg = mmovseg.VARIANTS["tiny"]
    vision = dataclasses.replace(cfg.clip.vision, depth=2, image_size=64)
    clip_cfg = dataclasses.replace(cfg.clip, vision=vision, text=dataclasses.replace(cfg.clip.text, depth=1))
    cfg = dataclasses.replace(cfg, clip=clip_cfg, dino=dataclasses.replace(cfg.dino, depth=2, image_size=64),
                              head=dataclasses.replace(cfg.head, num_layers=1), image_size=64,
                              clip_guidance_blocks=(0, 1), dino_blocks=(0, 1, 1))
    return mmovseg.Model(cfg, rngs=nnx.Rngs(0))


def test_def_model_remat_keeps_values_and_gradients():
    """Model(rgb, sar, tokens, remat): CLIP's towers and the head's aggregation and decoder
    blocks rematerialised give the same logits and parameter gradients."""
    model = _small_def_model()
    rng = np.random.default_rng(0)
    rgb, sar = (jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32) for _ in range(2))
    tokens = jnp.asarray(rng.integers(1, 1000, (3, 1, 8)), jnp.int32).at[:, :, -1].set(49407)
    graphdef, params = nnx.split(model)

    @jax.jit(static_argnums=1)
    def loss(p, remat):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(rgb, sar, tokens, remat)))

    with jax.default_matmul_precision("highest"):
        ref_loss, ref = jax.value_and_grad(loss)(params, "none")
        for policy in ("activation", "full", "dots"):
            value, grads = jax.value_and_grad(loss)(params, policy)
            np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-6)
            for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref)):
                r = np.asarray(r)
                np.testing.assert_allclose(np.asarray(g), r, atol=1e-6 * max(1.0, float(np.abs(r).max())),
                                           rtol=1e-5, err_msg=f"{policy}: {jax.tree_util.keystr(path)}")
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref["head"]))
    assert float(jnp.abs(ref["clip"]["text"]["blocks"][0]["attn"]["query"]["kernel"]).max()) > 0


def _def_run(remat: str, steps: int = 2):
    """Two DEF train steps (CLIP q/v trainable, the rest of CLIP and both DINOs frozen)
    of the small model on random tiles; -> (losses, trained parameters)."""
    c = def_configs.get_config()
    c.clip_finetune, c.remat, c.global_batch_size = "qv", remat, 2
    model = _small_def_model()
    mesh = sharding.make_mesh(1, 1)
    graphdef, tx, lr, state, state_shardings, frozen = def_stage.place(model, c, mesh)
    step = def_stage.make_train_step(graphdef, tx, lr, c, mesh, state_shardings)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 1000, (3, 1, 8)), jnp.int32).at[:, :, -1].set(49407)
    losses = []
    for _ in range(steps):
        batch = {"rgb": rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8),
                 "sar": rng.integers(0, 256, (2, 64, 64), dtype=np.uint8),
                 "label": rng.integers(0, 3, (2, 64, 64), dtype=np.uint8)}
        state, metrics = step(state, frozen, sharding.to_global(batch, mesh), tokens)
        losses.append(float(metrics["loss"]))
    return losses, state["params"]


def test_def_step_with_full_remat_changes_nothing():
    """config.remat = "full" in the DEF train step: the same losses and updated weights.
    The blocks hold frozen parameters beside the trained q/v kernels, which nnx.remat
    must be able to merge back (def_stage merges the step's model with copy=True)."""
    with jax.default_matmul_precision("highest"):
        plain_losses, plain_params = _def_run("none")
        losses, params = _def_run("full")
    np.testing.assert_allclose(losses, plain_losses, atol=1e-6, rtol=0)
    assert plain_losses[0] != plain_losses[1]
    _assert_same_training(params, plain_params)  # the classifier bias aside (3e-6 apart, measured)


def test_def_train_remat_refuses_an_unknown_policy():
    c = def_configs.get_config()
    assert loop.remat_policy(c) == "none"
    c.remat = "everything"
    with pytest.raises(ValueError, match=r"config.remat: 'everything' is not one of none, activation, full, dots"):
        loop.remat_policy(c)
