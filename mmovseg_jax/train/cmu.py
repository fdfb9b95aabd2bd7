"""CMU stage: align a SAR ViT (student) with a frozen RGB DINO ViT (teacher).

    python -m mmovseg_jax.main --config configs/cmu.py --workdir /tmp/cmu

The teacher sees the optical tile, the student the co-registered SAR tile (one channel
replicated to three, both CLIP-normalised as in MM-OVSeg); the student starts from the
teacher's weights. Per chosen block, the two token sequences are embedded (CLS, mean of
patches, or every patch) and pulled together by InfoNCE over the global batch (or MSE /
L1); the block losses are averaged. One jitted step runs over a device mesh: the batch
is split over the "data" axis, parameters are replicated, and InfoNCE gathers its
negatives from every device. Cross-modal retrieval on held-out pairs (SAR -> RGB among
N candidates) is measured before and after training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mmovseg_jax import losses
from mmovseg_jax.data import sources
from mmovseg_jax.data.preprocess import normalize, sar_as_rgb
from mmovseg_jax.models import dino, dinov3, fp8_inference, params, storage
from mmovseg_jax.train import loop, optim, sharding
from mmovseg_jax.train.checkpointing import Checkpointer
from mmovseg_jax.train.reporting import Reporter


class Dinov3Tokens(dinov3.Model):
    """A DINOv3 ViT whose call returns CLS then patch tokens, registers dropped: the
    (B, 1+N, D) layout CMU's embeddings read. Same parameters as dinov3.Model (saved and
    loaded as family "dinov3")."""

    def __call__(self, images: jax.Array, block_indices=(-1,), norm: bool = True,
                 remat: str = "none") -> tuple[jax.Array, ...]:
        r = self.config.num_register_tokens
        return tuple(jnp.concatenate([x[:, :1], x[:, 1 + r:]], axis=1)
                     for x in super().__call__(images, block_indices, norm, remat))

    def patch_tokens(self, images: jax.Array, block_indices) -> tuple[jax.Array, ...]:
        """Normalised patch tokens (B, N, D) per requested block, as dinov3.Model's."""
        return tuple(x[:, 1:] for x in self(images, block_indices, norm=True))


def encoder_family(config) -> str:
    """Storage family (and original checkpoint format) of a CMU encoder config: "dino" or "dinov3"."""
    return "dinov3" if isinstance(config, dinov3.Config) else "dino"


def encoder_class(config) -> type:
    """The module CMU builds for an encoder config (DINO v1 or DINOv3)."""
    return Dinov3Tokens if isinstance(config, dinov3.Config) else dino.Model


class Aligner(nnx.Module):
    """What CMU trains: the SAR student ViT, optional per-block projection heads for each
    side, and the InfoNCE temperature when it is learned."""

    def __init__(self, encoder: dino.Config | dinov3.Config, levels: int, projection_dim: int = 0,
                 temperature: float = 0.1, learn_temperature: bool = False, *, rngs: nnx.Rngs):
        self.student = encoder_class(encoder)(encoder, rngs=rngs)

        def heads() -> nnx.List:
            return nnx.List([nnx.Linear(encoder.width, projection_dim, rngs=rngs)
                             for _ in range(levels if projection_dim else 0)])

        self.student_heads = heads()
        self.teacher_heads = heads()
        self.fixed_temperature = float(temperature)
        self.log_temperature = nnx.Param(jnp.log(jnp.float32(temperature))) if learn_temperature else None

    def temperature(self) -> jax.Array | float:
        if self.log_temperature is None:
            return self.fixed_temperature
        return jnp.exp(self.log_temperature[...])

    def embed(self, tokens: jax.Array, level: int, side: str, mode: str) -> jax.Array:
        """(B, 1+N, D) tokens -> (B, E) or, for mode "dense", (B, N, E) embeddings."""
        x = losses.embed_tokens(tokens, mode)
        heads = self.student_heads if side == "student" else self.teacher_heads
        return heads[level](x) if len(heads) else x


def alignment_loss(aligner: Aligner, student_tokens, teacher_tokens, loss: ml_collections.ConfigDict,
                   mesh: Mesh) -> jax.Array:
    """Mean over blocks of the configured loss between student and teacher embeddings."""
    per_block = []
    for level, (s_tok, t_tok) in enumerate(zip(student_tokens, teacher_tokens)):
        s = aligner.embed(s_tok, level, "student", loss.embedding)
        t = aligner.embed(t_tok, level, "teacher", loss.embedding)
        if loss.kind in ("mse", "l1"):
            per_block.append(losses.regression_loss(s, t, loss.kind))
        elif loss.embedding == "dense":
            per_block.append(losses.dense_info_nce(s, t, aligner.temperature(), symmetric=loss.symmetric))
        else:
            per_block.append(losses.sharded_info_nce(s, t, aligner.temperature(), mesh=mesh, axis=sharding.BATCH_AXES,
                                                     symmetric=loss.symmetric, chunk_size=loss.chunk_size or None))
    return jnp.mean(jnp.stack(per_block))


# config.model.teacher_fp8: "off", or "static": the frozen teacher's block GEMMs in float8
# with scales calibrated once on the held-out tiles (models/fp8_inference.py), as for
# inference; the student keeps config.model.fp8.
TEACHER_FP8 = ("off", "static")


def teacher_fp8(config: ml_collections.ConfigDict) -> str:
    """config.model.teacher_fp8 ("off" when absent), refused with the field's name if not one of TEACHER_FP8."""
    choice = config.model.get("teacher_fp8", "off")
    if choice not in TEACHER_FP8:
        raise ValueError(f"config.model.teacher_fp8: {choice!r} is not one of {', '.join(TEACHER_FP8)}")
    if choice == "static" and config.model.dtype != "bfloat16":
        raise ValueError(f"config.model.teacher_fp8 = 'static' needs config.model.dtype = 'bfloat16', got "
                         f"{config.model.dtype!r}")
    return choice


def student_remat(config: ml_collections.ConfigDict) -> str:
    """config.remat ("none" when absent), the student's policy (layers.rematted), refused
    with the field's name if not one of layers.REMAT_POLICIES. "activation" with float8
    GEMMs (config.model.fp8) and the tanh GELU is refused too: XLA's GPU compiler (jax
    0.10.2, H200 target) folds the recomputed GELU into a float8 GEMM with an auxiliary
    output those GEMMs cannot emit and fails ("RET_CHECK ... !has_aux_output")."""
    policy = loop.remat_policy(config)
    kernels = storage.kernel_choices(config.model)
    if policy == "activation" and kernels["fp8"] and kernels["gelu"] == "tanh":
        raise ValueError("config.remat = 'activation' with config.model.fp8 = True and config.model.gelu = 'tanh' "
                         "does not compile for a GPU (XLA: RET_CHECK !has_aux_output); drop one of the three")
    return policy


def student_config(teacher_config: dino.Config | dinov3.Config, config: ml_collections.ConfigDict):
    """The student's encoder config: the teacher's, with config.model's own float8 choice
    (a teacher in static float8 does not make the student float8)."""
    return dataclasses.replace(teacher_config, fp8=bool(storage.kernel_choices(config.model)["fp8"]))


def uses_cls_shortcut(config: ml_collections.ConfigDict) -> bool:
    """Where the loss reads only CLS tokens, DINO encoders return just those and run their
    deepest block for the leading token rows alone: the same values for less work."""
    return config.loss.embedding == "cls" and config.get("cls_shortcut", True)


def encoder_tokens(model: nnx.Module, images: jax.Array, config: ml_collections.ConfigDict,
                   remat: str = "none") -> tuple[jax.Array, ...]:
    """Normalised images (B, H, W, 3) -> the tokens of each of config.blocks, (B, 1+N, D)
    (CLS rows only under the CLS shortcut), as the train step computes them."""
    if uses_cls_shortcut(config) and type(model) is dino.Model:
        return model(images, tuple(config.blocks), cls_only=True, remat=remat)
    return model(images, tuple(config.blocks), remat=remat)


def freeze_teacher(teacher: nnx.Module, config: ml_collections.ConfigDict, rgb_batches: list) -> dict[str, int]:
    """For config.model.teacher_fp8 = "static": calibrates the teacher's float8 layers on
    uint8 RGB batches (B, H, W, 3) through the forward the train step runs, then freezes
    them (fp8_inference.prepare; with several processes, every process calls it). The
    batches run in pieces of the step's per-device batch, so that any layout of the same
    global batch over processes and devices computes the same ranges. Returns
    fp8_inference.prepare's counts {"batches" (pieces), "layers", "frozen"}."""
    if not rgb_batches:
        raise ValueError("config.model.teacher_fp8 = 'static' calibrates the teacher on the held-out pairs, and "
                         "config.eval.num_pairs gives none")
    per_device = max(1, config.global_batch_size // jax.device_count())
    pieces = [b[i:i + per_device] for b in rgb_batches for i in range(0, len(b), per_device)]
    return fp8_inference.prepare(teacher, lambda m, rgb: encoder_tokens(m, normalize(rgb), config), pieces)


def prepare(batch: dict) -> tuple[jax.Array, jax.Array]:
    """uint8 batch -> (normalised RGB, normalised three-channel SAR), each (B, H, W, 3)."""
    return normalize(batch["rgb"]), normalize(sar_as_rgb(batch["sar"]))


def make_train_step(aligner_def, teacher_def, tx: optax.GradientTransformation, lr: optax.Schedule,
                    config: ml_collections.ConfigDict, mesh: Mesh, state_shardings):
    """A jitted step: (state, teacher_params, batch) -> (state, metrics). The teacher runs
    without gradients; only the aligner's parameters have optimiser state. The new state
    keeps `state_shardings`; the state passed in is donated."""
    # The student's blocks may recompute their activations in the backward pass
    # (config.remat: none | activation | full | dots, layers.rematted) to fit larger batches or
    # move fewer bytes; the teacher keeps none anyway.
    remat = student_remat(config)

    # FSDP: weights are gathered whole for the forward and backward passes, gradients are
    # reduce-scattered back to the parameters' shards; activations stay split by batch.
    gathered = jax.tree.map(lambda _: sharding.replicated(mesh), state_shardings["params"])

    def step(state, teacher_params, batch):
        rgb, sar = prepare(batch)
        teacher = nnx.merge(teacher_def, jax.lax.with_sharding_constraint(
            teacher_params, jax.tree.map(lambda _: sharding.replicated(mesh), teacher_params)))
        teacher_tokens = jax.lax.stop_gradient(encoder_tokens(teacher, rgb, config))

        def loss_fn(p):
            aligner = nnx.merge(aligner_def, jax.lax.with_sharding_constraint(p, gathered))
            student_tokens = encoder_tokens(aligner.student, sar, config, remat)
            loss = alignment_loss(aligner, student_tokens, teacher_tokens, config.loss, mesh)
            return loop.inject_nan(loss, state["step"], config.faults)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        grads = jax.lax.with_sharding_constraint(grads, state_shardings["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "lr": lr(state["step"]), "grad_norm": optax.global_norm(grads)}
        if config.loss.learn_temperature:
            metrics["temperature"] = nnx.merge(aligner_def, new_params).temperature()
        return loop.guard(state, new_params, opt_state, metrics, config.faults.on_nonfinite)

    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, sharding.replicated(mesh)))


def make_embed_fn(aligner_def, teacher_def, config: ml_collections.ConfigDict):
    """Jitted (aligner_params, teacher_params, batch) -> (SAR, RGB) unit embeddings (B, E) of
    the last configured block, as used for retrieval. With dense embeddings each patch
    embedding is normalised and the map flattened (over sqrt(N)), so the score of two
    tiles is the mean cosine similarity of their patches location by location."""
    block = (tuple(config.blocks)[-1],)
    mode = config.loss.embedding
    level = len(config.blocks) - 1

    def unit(x):
        x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return x.reshape(x.shape[0], -1) / jnp.sqrt(x.shape[1]) if x.ndim == 3 else x

    def embed(aligner_params, teacher_params, batch):
        rgb, sar = prepare(batch)
        aligner = nnx.merge(aligner_def, aligner_params)
        teacher = nnx.merge(teacher_def, teacher_params)
        s = aligner.embed(aligner.student(sar, block)[0], level, "student", mode)
        t = aligner.embed(teacher(rgb, block)[0], level, "teacher", mode)
        return unit(s), unit(t)

    return jax.jit(embed)


def retrieval(embed_fn, aligner_params, teacher_params, eval_batches, mesh: Mesh) -> dict:
    """SAR -> RGB retrieval among all held-out pairs: top-1/top-5 accuracy and chance levels."""
    sar_emb, rgb_emb = [], []
    for batch in eval_batches:
        s, t = embed_fn(aligner_params, teacher_params, sharding.to_global(batch, mesh))
        sar_emb.append(np.asarray(multihost_utils.process_allgather(s, tiled=True)))
        rgb_emb.append(np.asarray(multihost_utils.process_allgather(t, tiled=True)))
    sar_emb, rgb_emb = np.concatenate(sar_emb), np.concatenate(rgb_emb)
    sim = sar_emb @ rgb_emb.T
    rank = (sim > np.diag(sim)[:, None]).sum(axis=1)  # candidates scored above the true pair
    n = len(sim)
    return {"candidates": n, "top1": float((rank < 1).mean()), "top5": float((rank < 5).mean()),
            "chance_top1": 1 / n, "chance_top5": min(5 / n, 1.0)}


def build_teacher(config: ml_collections.ConfigDict) -> nnx.Module:
    """The frozen RGB teacher: a converted DINO / DINOv3 checkpoint, or random weights of
    config.model (config.model.family "v1" | "v3" picks the generation). With
    config.model.teacher_fp8 = "static" its block GEMMs are float8 layers, still to be
    calibrated (`freeze_teacher`)."""
    choices = {**storage.kernel_choices(config.model), **({"fp8": True} if teacher_fp8(config) == "static" else {})}
    if config.teacher_checkpoint:
        stored = storage.read(config.teacher_checkpoint)
        if stored.family not in ("dino", "dinov3"):
            raise ValueError(f"{config.teacher_checkpoint} holds a {stored.family} model, not dino or dinov3")
        cfg = storage.with_kernels(dataclasses.replace(stored.config, dtype=config.model.dtype), **choices)
        teacher = nnx.eval_shape(lambda: encoder_class(cfg)(cfg, rngs=nnx.Rngs(0)))
        params.set_params(teacher, stored.params, f"{config.teacher_checkpoint}/params")
        return teacher
    if config.teacher_required:
        raise ValueError("config.teacher_checkpoint is empty: this setting starts from a pretrained DINO; convert "
                         "one with `python -m convert.to_flax dino_vitbase16_pretrain.pth OUT` and pass "
                         "--config.teacher_checkpoint=OUT (or --config.teacher_required=False for random weights)")
    m = config.model
    family = m.get("family", "v1")
    if family not in ("v1", "v3"):
        raise ValueError(f"config.model.family: {family!r} is not 'v1' (DINO) or 'v3' (DINOv3)")
    module = dinov3 if family == "v3" else dino
    if m.variant:
        if m.variant not in module.VARIANTS:
            raise ValueError(f"config.model.variant: {m.variant!r} is not one of {sorted(module.VARIANTS)} "
                             f"(family {family})")
        base = module.VARIANTS[m.variant]
    else:
        base = module.Config(patch_size=m.patch_size, width=m.width, depth=m.depth, num_heads=m.num_heads,
                             mlp_dim=4 * m.width)
    cfg = storage.with_kernels(dataclasses.replace(base, image_size=m.image_size, dtype=m.dtype), **choices)
    return encoder_class(cfg)(cfg, rngs=nnx.Rngs(config.seed))


class Setup(NamedTuple):
    """What `place` returns: the graph definitions, the optimiser and its schedule, and the
    train state and teacher weights on the mesh (with the state's shardings)."""

    aligner_def: Any
    teacher_def: Any
    tx: optax.GradientTransformation
    lr: optax.Schedule
    state: dict
    state_shardings: Any
    teacher_params: Any


def place(aligner: Aligner, teacher: nnx.Module, config: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
    """Starts the student as a copy of the teacher (a copy: the step donates the student's
    buffers), builds the optimiser and the train state, and puts the state and the teacher
    on `mesh` (the teacher split over fsdp when config.mesh.shard_teacher, else replicated)."""
    nnx.update(aligner.student, jax.tree.map(jnp.copy, nnx.state(teacher, nnx.Param)))
    aligner_def, aligner_params = nnx.split(aligner)
    teacher_def, teacher_params = nnx.split(teacher)
    tx, lr = optim.make(config.optimizer, config.total_steps)
    state = loop.initial_state(aligner_params, tx.init(aligner_params))
    state_shardings = sharding.state_shardings(state, mesh, config.mesh.rules)
    teacher_params = jax.device_put(teacher_params, sharding.state_shardings(teacher_params, mesh, config.mesh.rules)
                                    if config.mesh.shard_teacher else sharding.replicated(mesh))
    return Setup(aligner_def, teacher_def, tx, lr, jax.device_put(state, state_shardings), state_shardings,
                 teacher_params)


def _eval_batches(source, config) -> list[dict]:
    it = sources.eval_iterator(source, config)
    return [{"rgb": b["rgb"], "sar": b["sar"]} for b in it]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the CMU stage in `workdir`; returns the final summary."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    sharding.check_batch_size(config.global_batch_size, mesh)
    loop.check_faults_config(config.faults)
    if not config.blocks:
        raise ValueError("config.blocks: give at least one block index")

    train_source, eval_source = sources.train_and_eval(config)
    teacher = build_teacher(config)
    if jax.process_index() == 0:
        print(f"CMU: teacher {teacher.config}; blocks {tuple(config.blocks)}; loss {config.loss.kind}/"
              f"{config.loss.embedding}; mesh {dict(mesh.shape)} over {jax.device_count()} "
              f"{jax.devices()[0].platform} devices; global batch {config.global_batch_size}", flush=True)
    aligner = Aligner(student_config(teacher.config, config), len(config.blocks), config.loss.projection_dim,
                      config.loss.temperature, config.loss.learn_temperature, rngs=nnx.Rngs(config.seed + 1))
    eval_batches = _eval_batches(eval_source, config)
    if teacher_fp8(config) == "static":  # the same held-out tiles on every run, so a resume gets the same scales
        counts = freeze_teacher(teacher, config, [b["rgb"] for b in eval_batches])
        if jax.process_index() == 0:
            amaxes = workdir / "teacher_fp8_amax.json"
            amaxes.write_text(json.dumps(fp8_inference.input_amaxes(teacher), indent=1) + "\n")
            print(f"teacher in float8 with static scales: {counts['frozen']} of {counts['layers']} layers "
                  f"calibrated on the held-out tiles ({counts['batches']} per-device batches); their input "
                  f"ranges: {amaxes}", flush=True)
    setup = place(aligner, teacher, config, mesh)
    aligner_def, teacher_def, tx, lr = setup.aligner_def, setup.teacher_def, setup.tx, setup.lr
    state, state_shardings, teacher_params = setup.state, setup.state_shardings, setup.teacher_params
    if jax.process_index() == 0:
        sizes = [(x.size, x.sharding.is_fully_replicated) for x in jax.tree.leaves(state["params"])]
        total = sum(n for n, _ in sizes)
        split = sum(n for n, rep in sizes if not rep)
        print(f"trainable parameters {total / 1e6:.2f} M, {100 * split / total:.0f}% split over fsdp = "
              f"{mesh.shape[sharding.FSDP]}", flush=True)

    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, save_every=config.checkpoint_every)
    state, start, start_batch = checkpointer.resume(state)
    train_iter = sources.train_iterator(train_source, config, start_batch)
    reporter = Reporter(workdir, config.total_steps, start, tensorboard=config.tensorboard)
    reporter.truncate_after(start)

    embed_fn = make_embed_fn(aligner_def, teacher_def, config)
    init_path = workdir / "retrieval_init.json"
    if init_path.exists():
        before = json.loads(init_path.read_text())
    else:
        before = retrieval(embed_fn, state["params"], teacher_params, eval_batches, mesh)
        if jax.process_index() == 0:
            init_path.write_text(json.dumps(before, indent=2) + "\n")

    train_step = make_train_step(aligner_def, teacher_def, tx, lr, config, mesh, state_shardings)
    state, stopped = loop.run_steps(
        lambda s, batch: train_step(s, teacher_params, sharding.to_global(
            {"rgb": batch["rgb"], "sar": batch["sar"]}, mesh)),
        state, train_iter, start, config, checkpointer, reporter, config.global_batch_size, sources.data_position)
    if stopped is not None:
        reporter.close()
        return {"stopped_at": stopped}
    loop.warn_skipped(train_source)

    after = retrieval(embed_fn, state["params"], teacher_params, eval_batches, mesh)
    # Whole parameters on every host (a collective: every process takes part).
    host_params = multihost_utils.process_allgather(state["params"], tiled=True)
    summary = {"steps": config.total_steps, "retrieval_init": before, "retrieval_final": after}
    if jax.process_index() == 0:
        (workdir / "retrieval.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"SAR -> RGB retrieval among {after['candidates']} held-out pairs "
              f"(chance: top-1 {after['chance_top1']:.3f}, top-5 {after['chance_top5']:.3f}):", flush=True)
        for name, r in (("initialisation", before), ("trained", after)):
            print(f"  {name:<15} top-1 {r['top1']:.3f}   top-5 {r['top5']:.3f}", flush=True)
        trained = nnx.merge(aligner_def, host_params)
        family = encoder_family(trained.student.config)
        export = storage.save(workdir / "sar_encoder", family, trained.student.config,
                              params.flat_params(trained.student), source={"format": family, "style": {},
                                                                           "trained_by": "mmovseg_jax CMU"})
        print(f"SAR encoder: {export} (to PyTorch: python -m convert.to_torch {export} sar_dino.pth)", flush=True)
        reporter.write({"step": config.total_steps, **{f"retrieval_{k}": v for k, v in after.items()
                                                      if k.startswith("top")}})
    reporter.close()
    return summary
