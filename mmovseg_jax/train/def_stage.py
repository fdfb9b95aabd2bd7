"""DEF stage: train and evaluate the full MM-OVSeg model on a benchmark setting.

    python -m mmovseg_jax.main --config configs/def.py --workdir /tmp/def            # synthetic
    python -m mmovseg_jax.main --config configs/def.py:ddhr_sk --workdir W --config.data.root=/data \
        --config.model.clip_checkpoint=C --config.model.rgb_dino_checkpoint=R --config.model.sar_dino_checkpoint=S

Both DINO encoders are frozen (not even in the optimiser state); CLIP trains its
attention query/value weights (or its whole transformer blocks, or nothing) at
`clip_lr_multiplier` x the base learning rate; everything else (DINO level projections,
CLIP guidance upsamplers, the head) at the base rate. One jitted step over the (data,
fsdp) mesh: the batch is split over devices, trainable parameters and optimiser state
over fsdp. The text embeddings of the training classes are recomputed in every step
(CLIP's text tower trains too). `config.remat` (none | activation | full | dots) makes CLIP's
towers and the head's blocks recompute activations in the backward pass instead of keeping
them (less memory, same values). Evaluation (`config.mode = "eval"`, and at the end of
training) scores the test split with the test class list: WORKDIR/eval_test.json and .md.
`config.eval.fp8` picks the precision it scores in (`eval_segmenter`): the model's own, or
float8 with current or static scales (static: calibrated on a few tiles first).
"""

from __future__ import annotations

import dataclasses
import json
import sys
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

from mmovseg_jax import cli, segmentation_losses
from mmovseg_jax.data import benchmarks, clouds, pipeline, seg_augment, sources
from mmovseg_jax.data.preprocess import normalize, sar_as_rgb
from mmovseg_jax.evaluation import metrics
from mmovseg_jax.inference import Segmenter
from mmovseg_jax.models import mmovseg, params, storage, tokenizer
from mmovseg_jax.ops import resize
from mmovseg_jax.train import loop, optim, sharding
from mmovseg_jax.train.checkpointing import Checkpointer
from mmovseg_jax.train.examples import ExampleImages
from mmovseg_jax.train.reporting import Reporter

CLIP_FINETUNE = ("qv", "full", "frozen")
MODES = ("train", "eval", "robustness")
EVAL_FP8 = ("model", "off", "on", "static")
CALIBRATION_SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- model

def _load_encoder(folder: str, family: str) -> storage.Stored:
    stored = storage.read(folder)
    if stored.family != family:
        raise ValueError(f"{folder} holds a {stored.family} model, not {family}")
    return stored


def build_model(m: ml_collections.ConfigDict) -> tuple[mmovseg.Model, str]:
    """The model named by config.model and the folder holding its tokenizer files.

    A full converted/trained model folder (`checkpoint`), or the architecture `variant`
    with encoders from converted CLIP / DINO folders where given (random weights where not).
    """
    if m.checkpoint:
        model = storage.load_model(m.checkpoint, expect_family="mmovseg", dtype=m.dtype,
                                   **storage.kernel_choices(m))
        if model.config.use_sar != m.use_sar:
            raise ValueError(f"config.model.use_sar={m.use_sar} but {m.checkpoint} has use_sar={model.config.use_sar}")
        return model, m.checkpoint
    if m.variant not in mmovseg.VARIANTS:
        raise ValueError(f"config.model.variant: {m.variant!r} is not one of {sorted(mmovseg.VARIANTS)}")
    missing = [f for f in ("clip_checkpoint", "rgb_dino_checkpoint", "sar_dino_checkpoint")
               if not m[f] and not (f == "sar_dino_checkpoint" and not m.use_sar)]
    if m.require_pretrained and missing:
        raise ValueError(f"config.model.{missing[0]} is empty: this setting starts from pretrained encoders "
                         f"(convert them with python -m convert.to_flax; --config.model.require_pretrained=False "
                         f"trains from random weights)")
    cfg = dataclasses.replace(mmovseg.VARIANTS[m.variant], use_sar=m.use_sar, dtype=m.dtype)
    if m.head_layers >= 0:
        cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, num_layers=m.head_layers))
    stored = {}
    if m.clip_checkpoint:
        stored["clip"] = _load_encoder(m.clip_checkpoint, "clip")
        cfg = dataclasses.replace(cfg, clip=stored["clip"].config)
    dino_family = "dinov3" if cfg.dino_family == "v3" else "dino"  # the variant's DINO generation
    for name in ("rgb_dino", "sar_dino"):
        if m[f"{name}_checkpoint"] and (name == "rgb_dino" or m.use_sar):
            stored[name] = _load_encoder(m[f"{name}_checkpoint"], dino_family)
    if stored.get("rgb_dino"):
        dino_cfg = stored["rgb_dino"].config
        if stored.get("sar_dino") and stored["sar_dino"].config != dino_cfg:
            raise ValueError(f"{m.sar_dino_checkpoint} ({stored['sar_dino'].config}) and {m.rgb_dino_checkpoint} "
                             f"({dino_cfg}) are different architectures")
        cfg = dataclasses.replace(cfg, dino=dino_cfg)
    elif stored.get("sar_dino"):
        cfg = dataclasses.replace(cfg, dino=stored["sar_dino"].config)
    model = mmovseg.Model(storage.with_kernels(cfg, **storage.kernel_choices(m)), rngs=nnx.Rngs(m.seed))
    for name, s in stored.items():
        params.set_params(getattr(model, name), s.params, f"config.model.{name}_checkpoint")
    return model, (m.clip_checkpoint or str(tokenizer.BUNDLED_BPE))


def is_trainable(finetune: str):
    """nnx filter (path, value) -> bool of the parameters DEF trains; DINO never trains."""
    if finetune not in CLIP_FINETUNE:
        raise ValueError(f"config.clip_finetune: {finetune!r} is not one of {CLIP_FINETUNE}")

    def trainable(path, value) -> bool:
        names = [str(p) for p in path]
        if not isinstance(value, nnx.Param) or names[0] in ("rgb_dino", "sar_dino"):
            return False
        if names[0] != "clip":
            return True
        if finetune == "full":  # every transformer block of both towers (the release's "full")
            return "blocks" in names
        if finetune == "qv":  # attention query and value weights (the release's "attention")
            return "attn" in names and names[-2] in ("query", "value") and names[-1] == "kernel"
        return False

    return trainable


def param_groups(multiplier: float):
    """(labels_fn, multipliers) for optim.make: CLIP at `multiplier` x the base rate."""
    def labels(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "clip" if getattr(path[0], "key", None) == "clip" else "base", tree)
    return labels, {"base": 1.0, "clip": multiplier}


class Setup(NamedTuple):
    """What `place` returns: the graph definition, the optimiser and its schedule, the train
    state on the mesh with its shardings, and the frozen parameters on the mesh."""

    graphdef: Any
    tx: optax.GradientTransformation
    lr: optax.Schedule
    state: dict
    state_shardings: Any
    frozen: Any


def place(model: mmovseg.Model, config: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
    """Splits `model` into the parameters DEF trains (`is_trainable(config.clip_finetune)`)
    and the frozen rest, builds the optimiser and the train state, and puts the state and
    the frozen parameters on `mesh` (those split over fsdp when config.mesh.shard_frozen,
    else replicated)."""
    graphdef, trainable, frozen = nnx.split(model, is_trainable(config.clip_finetune), ...)
    tx, lr = optim.make(config.optimizer, config.total_steps, param_groups(config.clip_lr_multiplier))
    state = loop.initial_state(trainable, tx.init(trainable))
    state_shardings = sharding.state_shardings(state, mesh, config.mesh.rules)
    frozen = jax.device_put(frozen, sharding.state_shardings(frozen, mesh, config.mesh.rules) if config.mesh.shard_frozen
                            else sharding.replicated(mesh))
    return Setup(graphdef, tx, lr, jax.device_put(state, state_shardings), state_shardings, frozen)


# ----------------------------------------------------------------------------- step

def prepare(batch: dict, use_sar: bool) -> tuple[jax.Array, jax.Array | None]:
    """uint8 batch -> CLIP-normalised RGB and three-channel SAR, (B, S, S, 3) float32."""
    return normalize(batch["rgb"]), (normalize(sar_as_rgb(batch["sar"])) if use_sar else None)


def cloud_augment(rgb: jax.Array, key: jax.Array, prob: float, presets: tuple[str, ...]) -> jax.Array:
    """Synthetic clouds on a random share `prob` of the tiles of a uint8 (B, S, S, 3) batch;
    one preset per batch, drawn from `presets`. Runs inside the jitted step."""
    unknown = [p for p in presets if p not in clouds.PRESETS]
    if unknown or not presets:
        raise ValueError(f"config.clouds.presets: {unknown or 'empty'}; known: {', '.join(clouds.PRESETS)}")
    k_preset, k_apply, k_cloud = jax.random.split(key, 3)
    image = rgb.astype(jnp.float32) / 255.0
    branches = [lambda k, x, p=clouds.PRESETS[name]: clouds.add_clouds(k, x, p)[0] for name in presets]
    cloudy = jax.lax.switch(jax.random.randint(k_preset, (), 0, len(presets)), branches, k_cloud, image)
    chosen = jax.random.bernoulli(k_apply, prob, (rgb.shape[0], 1, 1, 1))
    return jnp.where(chosen, jnp.round(cloudy * 255.0), rgb.astype(jnp.float32))


def make_train_step(graphdef, tx, lr, config: ml_collections.ConfigDict, mesh: Mesh, state_shardings):
    """Jitted (state, frozen, batch, tokens) -> (state, metrics); the state is donated."""
    gathered = jax.tree.map(lambda _: sharding.replicated(mesh), state_shardings["params"])
    use_sar = config.model.use_sar
    remat = loop.remat_policy(config)  # CLIP's towers and the head's blocks (mmovseg.Model.logits)

    cloud_key = jax.random.key(config.seed + 1)

    def step(state, frozen, batch, tokens):
        if config.clouds.prob > 0:  # the same clouds at a step whatever the mesh or restarts
            key = jax.random.fold_in(cloud_key, state["step"])
            batch = {**batch, "rgb": cloud_augment(batch["rgb"], key, config.clouds.prob, tuple(config.clouds.presets))}
        rgb, sar = prepare(batch, use_sar)
        labels = batch["label"]

        def loss_fn(trainable):
            # copy: fresh Variables made under this trace for the frozen parameters too (the
            # step's arguments were made under jit's); nnx.remat (config.remat) writes a
            # block's variables back after the call and refuses ones from another trace level
            model = nnx.merge(graphdef, jax.lax.with_sharding_constraint(trainable, gathered), frozen, copy=True)
            logits = model(rgb, sar, tokens, remat)
            logits = resize.resize_bilinear(logits, labels.shape[1:], axes=(2, 3))
            loss = segmentation_losses.segmentation_loss(logits, labels, config.loss.kind,
                                                         release_ignore=config.loss.release_ignore)
            return loop.inject_nan(loss, state["step"], config.faults)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        grads = jax.lax.with_sharding_constraint(grads, state_shardings["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        metrics_ = {"loss": loss, "lr": lr(state["step"]), "grad_norm": optax.global_norm(grads)}
        return loop.guard(state, new_params, opt_state, metrics_, config.faults.on_nonfinite)

    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, sharding.replicated(mesh)))


# ----------------------------------------------------------------------------- evaluation

def check_eval_config(e: ml_collections.ConfigDict) -> None:
    """ValueError naming the config.eval field that is out of range."""
    if e.fp8 not in EVAL_FP8:
        raise ValueError(f"config.eval.fp8: {e.fp8!r} is not one of {', '.join(EVAL_FP8)}")
    if e.fp8_calibration_split not in CALIBRATION_SPLITS:
        raise ValueError(f"config.eval.fp8_calibration_split: {e.fp8_calibration_split!r} is not one of "
                         f"{', '.join(CALIBRATION_SPLITS)}")
    if e.fp8 == "static" and e.fp8_calibration_tiles < 1:
        raise ValueError(f"config.eval.fp8_calibration_tiles must be >= 1, got {e.fp8_calibration_tiles}")


def precision(segmenter: Segmenter) -> str:
    """The compute precision a Segmenter scores in, for reports: "float32", "bfloat16",
    "bfloat16, float8 static", ..."""
    return segmenter.config.dtype + ("" if segmenter.fp8 == "off" else f", float8 {segmenter.fp8}")


def eval_segmenter(model: mmovseg.Model, tok, config: ml_collections.ConfigDict,
                   setting: benchmarks.Setting) -> Segmenter:
    """The Segmenter that scores `model` in config.eval.fp8's precision: "model" as built;
    "off" without float8 products; "on" float8 with current scaling, "static" float8
    calibrated on the first config.eval.fp8_calibration_tiles tiles of
    config.eval.fp8_calibration_split and frozen (both in bfloat16, the model's
    parameters unchanged; models/fp8_inference.py)."""
    e = config.eval
    check_eval_config(e)
    if e.fp8 == "off" and model.config.dino.fp8:
        model = storage.rebuild(model, "mmovseg", fp8=False)
    elif e.fp8 in ("on", "static") and not (model.config.dino.fp8 and model.config.dtype == "bfloat16"):
        model = storage.rebuild(model, "mmovseg", dtype="bfloat16", fp8=True)
    seg = Segmenter(model, tok, batch_size=e.batch_size)
    if e.fp8 == "static":
        source = _source(config, setting, e.fp8_calibration_split)
        count = min(e.fp8_calibration_tiles, len(source))
        records = [source[i] for i in range(count)]
        summary = seg.calibrate_fp8((r["rgb"], r["sar"] if seg.config.use_sar else None) for r in records)
        if jax.process_index() == 0:
            print(f"eval in float8, static scales from {count} {e.fp8_calibration_split} tiles: "
                  f"{summary['frozen']} of {summary['layers']} float8 layers frozen", flush=True)
    return seg


def score(segmenter: Segmenter, setting: benchmarks.Setting, source, config: ml_collections.ConfigDict,
          split: str = "test", transform=None, what: str = "eval test") -> dict:
    """Scores of `source` (labels in test-class order) with the split's class list. Every
    process takes records p, p + P, ...; `transform(record, index)` may alter a record
    first (clouds for the robustness sweep)."""
    classes = setting.classes(split)
    text = segmenter.text(classes)  # computed for this list, never reused from training
    acc = metrics.ConfusionAccumulator(len(classes))
    limit = len(source) if not config.eval.max_tiles else min(config.eval.max_tiles, len(source))
    mine = list(range(jax.process_index(), limit, jax.process_count()))
    done, batch = 0, config.eval.batch_size
    progress = cli.Progress(len(mine), sys.stdout, every=10.0, label=what, unit="tiles") \
        if jax.process_index() == 0 else None
    for i in range(0, len(mine), batch):
        records = [source[j] if transform is None else transform(source[j], j) for j in mine[i:i + batch]]
        sizes = {r["label"].shape for r in records}
        if len(sizes) == 1:
            probs = segmenter.probabilities_batch(np.stack([r["rgb"] for r in records]),
                                                  np.stack([r["sar"] for r in records]), text)
        else:
            probs = [segmenter.probabilities(r["rgb"], r["sar"], text) for r in records]
        for r, p in zip(records, probs):
            acc.add(np.argmax(p, axis=0), r["label"])
        done += len(records)
        if progress is not None:
            progress.update(done)
    total = np.asarray(multihost_utils.process_allgather(acc.matrix.astype(np.int64))).reshape(
        -1, len(classes), len(classes)).sum(axis=0) if jax.process_count() > 1 else acc.matrix
    scores = metrics.segmentation_scores(total, classes, seen=setting.seen)
    scores["setting"], scores["split"], scores["tiles"] = setting.name, split, limit
    scores["precision"] = precision(segmenter)
    return scores


def evaluate(segmenter: Segmenter, setting: benchmarks.Setting, source, config: ml_collections.ConfigDict,
             workdir: Path, split: str = "test") -> dict:
    """`score`, then WORKDIR/eval_<split>.json and .md and the printed table (process 0)."""
    scores = score(segmenter, setting, source, config, split)
    if jax.process_index() == 0:
        metrics.write_report(scores, workdir / f"eval_{split}.json", workdir / f"eval_{split}.md",
                             title=f"{setting.name} ({split}, {scores['precision']})")
        print(metrics.format_table(scores), flush=True)
    return scores


# ----------------------------------------------------------------------------- run

def _source(config: ml_collections.ConfigDict, setting: benchmarks.Setting, split: str):
    """The labelled records of `split` (the synthetic world renders config.data/eval.num_records)."""
    count = config.data.num_records if split == "train" else config.eval.num_records
    return benchmarks.build_source(setting, split, config.data.root or None, num_records=count,
                                   size=config.data.tile_size, seed=config.seed, cache=config.data.cache,
                                   skip_bad_samples=config.data.skip_bad_samples)


def export(model: mmovseg.Model, tokenizer_folder: str, workdir: Path, config) -> Path:
    """Writes the model as a model folder (WORKDIR/model): mmovseg.load / predict / convert.to_torch."""
    return storage.save(workdir / "model", "mmovseg", model.config, params.flat_params(model),
                        source={"format": "mmovseg_jax", "trained_by": "mmovseg_jax DEF",
                                "setting": config.setting, "steps": config.total_steps},
                        files=tokenizer.tokenizer_files(tokenizer_folder))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the DEF stage in `workdir`, or only evaluates (config.mode = "eval")."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.setting not in benchmarks.SETTINGS:
        raise ValueError(f"config.setting: {config.setting!r} is not one of {', '.join(benchmarks.SETTINGS)}")
    if config.mode not in MODES:
        raise ValueError(f"config.mode: {config.mode!r} is not one of {MODES}")
    check_eval_config(config.eval)
    loop.remat_policy(config)
    setting = benchmarks.SETTINGS[config.setting]
    model, tok_folder = build_model(config.model)
    test_source = _source(config, setting, "test")
    tok = tokenizer.Tokenizer(tok_folder, model.config.clip.text.context_length)
    if config.mode == "eval":
        scores = evaluate(eval_segmenter(model, tok, config, setting), setting, test_source, config, workdir)
        return {"eval": scores}
    if config.mode == "robustness":
        from mmovseg_jax import robustness

        if not config.model.checkpoint:
            raise ValueError("config.model.checkpoint is empty: --mode robustness scores a trained model folder "
                             "(WORKDIR/model of a DEF run, or a converted release checkpoint)")

        models = {"fused" if model.config.use_sar else "model": eval_segmenter(model, tok, config, setting)}
        if config.robustness.baseline_checkpoint:
            baseline = Segmenter.load(config.robustness.baseline_checkpoint)
            models["rgb_only"] = eval_segmenter(baseline.model, baseline.tokenizer, config, setting)
        return robustness.sweep(models, setting, test_source, config, workdir)

    train_source = _source(config, setting, "train")
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    sharding.check_batch_size(config.global_batch_size, mesh)
    loop.check_faults_config(config.faults)
    graphdef, tx, lr, state, state_shardings, frozen = place(model, config, mesh)
    tokens = jax.device_put(mmovseg.tokenize_classes(tok, setting.train_classes, model.config.templates),
                            sharding.replicated(mesh))
    if jax.process_index() == 0:
        n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
        n_all = n_train + sum(x.size for x in jax.tree.leaves(frozen))
        print(f"DEF {setting.name}: {len(train_source)} training tiles, classes {setting.train_classes} -> "
              f"{setting.test_classes}; {'RGB+SAR' if model.config.use_sar else 'RGB only'}; trainable "
              f"{n_train / 1e6:.2f} M of {n_all / 1e6:.2f} M parameters (CLIP {config.clip_finetune} at "
              f"x{config.clip_lr_multiplier}); mesh {dict(mesh.shape)} over {jax.device_count()} "
              f"{jax.devices()[0].platform} devices; global batch {config.global_batch_size}", flush=True)

    d = config.data
    augment = seg_augment.SegmentationAugment(crop_size=d.crop_size, short_edge=tuple(d.short_edge) or None,
                                              flip=d.flip, jitter_prob=d.jitter_prob)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, save_every=config.checkpoint_every)
    state, start, start_batch = checkpointer.resume(state)
    train_iter = pipeline.make_iterator(train_source, global_batch_size=config.global_batch_size, seed=config.seed,
                                        train=True, augment=augment, worker_count=d.worker_count,
                                        start_batch=start_batch)
    reporter = Reporter(workdir, config.total_steps, start, tensorboard=config.tensorboard)
    reporter.truncate_after(start)

    train_step = make_train_step(graphdef, tx, lr, config, mesh, state_shardings)
    examples = ExampleImages(graphdef, frozen, tok, setting, test_source, config, reporter)
    state, stopped = loop.run_steps(
        lambda s, batch: train_step(s, frozen, sharding.to_global(
            {k: batch[k] for k in ("rgb", "sar", "label")}, mesh), tokens),
        state, train_iter, start, config, checkpointer, reporter, config.global_batch_size, sources.data_position,
        on_log=examples.maybe_write)
    if stopped is not None:
        reporter.close()
        return {"stopped_at": stopped}
    loop.warn_skipped(train_source)

    host_trainable = multihost_utils.process_allgather(state["params"], tiled=True)
    trained = nnx.merge(graphdef, host_trainable, jax.device_get(frozen))
    summary = {"steps": config.total_steps}
    if jax.process_index() == 0:
        folder = export(trained, tok_folder, workdir, config)
        print(f"model: {folder} (segment a pair: python -m mmovseg_jax.predict --checkpoint {folder} ...; "
              f"to PyTorch: python -m convert.to_torch {folder} model.pth)", flush=True)
    scores = evaluate(eval_segmenter(trained, tok, config, setting), setting, test_source, config, workdir)
    summary["eval"] = {k: scores[k] for k in ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU") if k in scores}
    if jax.process_index() == 0:
        reporter.write({"step": config.total_steps, **{f"eval_{k}": v for k, v in summary["eval"].items()}})
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    reporter.close()
    return summary
