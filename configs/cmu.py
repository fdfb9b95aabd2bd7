"""CMU stage: a SAR ViT aligned to a frozen RGB DINO (mmovseg_jax/train/cmu.py).

    python -m mmovseg_jax.main --config configs/cmu.py --workdir /tmp/cmu
    python -m mmovseg_jax.main --config configs/cmu.py:paper --workdir /tmp/cmu_paper \
        --config.teacher_checkpoint=/models/dino_vitb16_flax \
        --config.data.spacenet6_root=/data/SN6 --config.data.dfc2023_root=/data/DFC2023

Variants:
  default      small ViT on the built-in synthetic RGB+SAR world; minutes on a laptop CPU
  paper        the paper's setting: DINO ViT-B/16 teacher and student from a converted
               checkpoint, batch 8, AdamW lr 3e-4, wd 1e-4, blocks 4/8/12, CMU-Data
               (SpaceNet 6 + DFC2023), paired translation/flip/scale/rotation
  official     as paper with DINO ViT-B/8 at the release's 384 px
  large        as paper with DINOv3 ViT-L/16 (SAT-493M) teacher and student, the ViT-L
               model's encoders (paper Appendix D), at 384 px, blocks 8/16/24; convert the
               teacher with `python -m convert.to_flax dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth OUT`
  large_batch  InfoNCE over a global batch of 16,384 pairs with chunked, sharded logits

Every field can be overridden: --config.loss.kind=l1, --config.loss.embedding=mean, ...
Block indices are 0-based (the paper's blocks 4, 8, 12 are 3, 7, 11).
"""

import ml_collections

VARIANTS = ("default", "paper", "official", "large", "large_batch")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/cmu.py; choose from {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.job = "cmu"
    c.seed = 0
    c.total_steps = 400
    c.global_batch_size = 32
    c.log_every = 25
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.tensorboard = True
    # on_nonfinite: a NaN/inf loss or gradient stops training ("stop", the last checkpoint
    # being the last good state) or its update is dropped and counted ("skip").
    # inject_nan_at: make the loss NaN at this step (1-based; 0 never), to test that.
    c.faults = ml_collections.ConfigDict(dict(on_nonfinite="stop", inject_nan_at=0))
    # data x fsdp devices (data = -1: the rest). fsdp > 1 splits parameters and optimiser
    # state over that axis; shard_teacher splits the frozen teacher's weights too.
    # rules: (regex, spec) pairs overriding the automatic split by parameter name, e.g.
    # (("pos_embed", "replicated"), ("fc1.kernel", "None,fsdp")); see train/sharding.py.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_teacher=False, rules=()))

    # The teacher: a converted DINO folder (python -m convert.to_flax ...) or, when empty,
    # random weights of `model`. The student always starts from the teacher's weights.
    c.teacher_checkpoint = ""
    c.teacher_required = False  # True: refuse to start from random weights
    # family: "v1" (DINO) or "v3" (DINOv3); variant: a key of that family's VARIANTS, or ""
    # for the small ViT given by patch_size ... num_heads.
    c.model = ml_collections.ConfigDict(dict(
        family="v1", variant="", patch_size=8, width=128, depth=4, num_heads=4, image_size=64, dtype="float32",
        attention="xla",  # xla (exact) | cudnn (flash attention, padded + masked tokens) | auto (cudnn on GPU in bf16)
        fp8=False,  # teacher and student block GEMMs in float8 (bf16 dtype; H100/H200; changes results, ops/fp8.py)
        # off | static: the frozen teacher's block GEMMs in float8 with scales calibrated once
        # on the held-out tiles (models/fp8_inference.py; bf16 dtype; changes results)
        teacher_fp8="off",
        residual_dtype="float32",  # float32 | bfloat16: the encoders' residual stream (changes results)
        gelu="exact"))  # exact | tanh: the MLP's GELU (tanh folds into the fc1 GEMM on a GPU; changes results)
    c.blocks = (1, 3)

    c.loss = ml_collections.ConfigDict(dict(
        kind="infonce",        # infonce | mse | l1 (paper Table 4)
        embedding="dense",     # dense (per-patch InfoNCE) | cls | mean (of patch tokens)
        temperature=0.1,
        learn_temperature=False,
        symmetric=True,        # SAR->RGB and RGB->SAR, or SAR->RGB only
        chunk_size=0,          # >0: InfoNCE logits in chunks of this many keys per device
        projection_dim=0,      # >0: a linear head per block and side before the loss
    ))
    # With embedding="cls", DINO (v1) encoders run their deepest block's projections and MLP
    # for its first two token rows only (the other tokens of that block are never read): the
    # same loss for about 6% fewer FLOPs at 224 px. False runs every token, as the PyTorch
    # release does.
    c.cls_shortcut = True
    # Activation memory of the student's blocks in the backward pass: none (keep all),
    # activation (keep all but the MLP GELU's intermediates, recomputed from its input:
    # less memory traffic, a speed option), full (keep block inputs, recompute the rest:
    # ~1 more forward of compute) or dots (keep weight-matmul outputs). The same numbers
    # up to float rounding; full and dots are for batches that do not fit otherwise.
    c.remat = "none"
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, weight_decay=1e-4, b1=0.9, b2=0.999, warmup_steps=40, schedule="cosine",
        grad_clip=1.0))

    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",    # synthetic | folder | spacenet6 | dfc2023 | cmu (spacenet6 + dfc2023) | arrayrecord
        num_records=2304,      # synthetic world size (training + held-out)
        cache=True,            # keep generated synthetic scenes in memory
        tile_size=96,          # synthetic tile size before cropping
        root="",               # folder / arrayrecord (comma-separated files) sources
        skip_bad_samples=False,  # True: an unreadable sample is replaced by the next one and counted
        spacenet6_root="", spacenet6_band="HH", dfc2023_root="", dfc2023_split="train",
        crop_size=64,          # training and evaluation resolution
        worker_count=0,        # Grain worker processes (0: in the main process)
        augment=ml_collections.ConfigDict(dict(scale=(0.8, 1.25), max_rotation_deg=180.0, flip=True,
                                               translate=0.1)),
    ))
    # Retrieval on held-out pairs (the last num_pairs records of the source).
    c.eval = ml_collections.ConfigDict(dict(num_pairs=256, batch_size=64))

    if variant in ("paper", "official", "large"):
        c.total_steps = 30_000
        c.global_batch_size = 8
        c.log_every = 50
        c.checkpoint_every = 1000
        c.keep_checkpoints = 3
        c.teacher_required = True
        c.model.variant = {"paper": "B/16", "official": "B/8", "large": "L/16"}[variant]
        c.model.family = "v3" if variant == "large" else "v1"
        c.model.image_size = 224 if variant == "paper" else 384
        c.model.dtype = "bfloat16"
        c.model.attention = "auto"  # cuDNN flash attention on a GPU (bf16), XLA elsewhere
        # the paper's blocks 4/8/12 of 12; for the 24-block ViT-L, DEF's levels 8/16/24
        c.blocks = (7, 15, 23) if variant == "large" else (3, 7, 11)
        c.optimizer.lr = 3e-4
        c.optimizer.warmup_steps = 500
        c.optimizer.grad_clip = 0.0
        c.data.source = "cmu"
        c.data.crop_size = c.model.image_size
        c.data.worker_count = 8
        c.eval.num_pairs = 1000
        c.eval.batch_size = 8
    if variant == "large_batch":
        c.global_batch_size = 16_384
        c.total_steps = 10_000
        c.teacher_required = True
        c.model.variant = "B/16"
        c.model.image_size = 224
        c.model.dtype = "bfloat16"
        c.model.attention = "auto"  # cuDNN flash attention on a GPU (bf16), XLA elsewhere
        c.blocks = (3, 7, 11)
        c.loss.embedding = "cls"  # one embedding per tile: negatives from the whole global batch
        c.loss.chunk_size = 1024
        c.loss.learn_temperature = True
        c.loss.temperature = 0.07
        c.optimizer.lr = 1e-3
        c.optimizer.warmup_steps = 1000
        c.data.source = "cmu"
        c.data.crop_size = 224
        c.data.worker_count = 16
        c.eval.num_pairs = 2000
        c.eval.batch_size = 256
    return c
