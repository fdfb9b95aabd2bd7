"""DEF stage: the full MM-OVSeg model trained and scored on a benchmark setting
(mmovseg_jax/train/def_stage.py).

    python -m mmovseg_jax.main --config configs/def.py --workdir /tmp/def
    python -m mmovseg_jax.main --config configs/def.py:ddhr_sk --workdir /tmp/ddhr_sk \
        --config.data.root=/data/MM-OVSeg \
        --config.model.clip_checkpoint=/models/clip_b16 \
        --config.model.rgb_dino_checkpoint=/models/rsib_dino_b8 \
        --config.model.sar_dino_checkpoint=/tmp/cmu_official/sar_encoder
    python -m mmovseg_jax.main --config configs/def.py:ddhr_sk --workdir /tmp/ddhr_sk_eval \
        --config.mode=eval --config.model.checkpoint=/models/mmovseg_release_flax --config.data.root=...

Variants (REFERENCE.md sections 1 and 3):
  synthetic      (default) tiny model on the built-in synthetic world, minutes on a CPU;
                 seen: water, forest, city, farmland; unseen: road, bare soil. Its CLIP
                 is random (no language prior), so unseen classes stay near chance.
  pie_cloud      PIE-cloud -> PIE-cloud       pie_clean      PIE-clean -> PIE-clean
  ddhr_sk        DDHR-SK -> DDHR-SK           ddhr_sk_to_ch  DDHR-SK -> DDHR-CH
  oem_thick      OEM-thick -> OEM-thick       oem_thin       OEM-thin -> OEM-thin
The paper settings use the released architecture (CLIP B/16, DINO B/8 at 384), AdamW
lr 2.5e-4, wd 1e-4, CLIP q/v at lr x 0.01, global-norm clip 0.01, cosine, batch 8,
120k steps, BCE with ignore pixels excluded.
Each paper setting also has a SETTING_large variant (e.g. pie_cloud_large): the ViT-L
model of the paper's Appendix D and the release's MMOVL14.py (CLIP L/14@336 on the tile
resized to 336, DINOv3 L/16 SAT-493M at 384 for RGB and SAR, head width 768), trained
as above; give DINOv3 folders (python -m convert.to_flax dinov3_vitl16_pretrain_sat493m-
eadcf0ff.pth OUT) as rgb/sar_dino_checkpoint. The release's vitl_336.yaml uses batch 4
and 80k iterations; the paper does not say whether its L runs differ from B's.

Useful overrides: --config.model.use_sar=False (RGB-only baseline, paper Table 3),
--config.model.head_layers=0 (no cost aggregation, the paper's prose),
--config.model.variant=B_dino16 (DINO patch 16), --config.clip_finetune=full|frozen,
--config.loss.kind=ce, --config.loss.release_ignore=True (the release's BCE).
"""

import ml_collections

PAPER_SETTINGS = ("pie_cloud", "ddhr_sk", "oem_thick", "oem_thin", "pie_clean", "ddhr_sk_to_ch")
SETTINGS = ("synthetic", *PAPER_SETTINGS, *(f"{s}_large" for s in PAPER_SETTINGS))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "synthetic"
    if variant not in SETTINGS:
        raise ValueError(f"unknown variant {variant!r} of configs/def.py; choose from {SETTINGS}")
    large = variant.endswith("_large")
    setting = variant.removesuffix("_large")
    c = ml_collections.ConfigDict()
    c.job = "def"
    c.mode = "train"  # train (then evaluate) | eval | robustness
    c.setting = setting
    c.seed = 0
    c.total_steps = 600
    c.global_batch_size = 8
    c.log_every = 25
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.tensorboard = True
    c.image_every = 200    # TensorBoard example predictions every N steps (0: never)
    c.image_tiles = 4      # ... on the first N test tiles
    # on_nonfinite: a NaN/inf loss or gradient stops training ("stop", the last checkpoint
    # being the last good state) or its update is dropped and counted ("skip").
    # inject_nan_at: make the loss NaN at this step (1-based; 0 never), to test that.
    c.faults = ml_collections.ConfigDict(dict(on_nonfinite="stop", inject_nan_at=0))
    # data x fsdp devices; fsdp > 1 splits trainable parameters and optimiser state,
    # shard_frozen the frozen encoders too; rules: name-based overrides (train/sharding.py).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_frozen=False, rules=()))

    c.model = ml_collections.ConfigDict(dict(
        checkpoint="",            # a full model folder (converted release checkpoint or WORKDIR/model)
        variant="tiny",           # B | B_dino16 | L | tiny | tiny_v3 (architecture when no full checkpoint)
        clip_checkpoint="",       # converted CLIP folder (python -m convert.to_flax ...)
        rgb_dino_checkpoint="",   # converted DINO folder (the release's RSIB.pth; DINOv3 for L)
        sar_dino_checkpoint="",   # the CMU stage's WORKDIR/sar_encoder, or a converted SAR DINO
        require_pretrained=False,
        use_sar=True,
        head_layers=-1,           # >= 0 overrides the variant's aggregation layers
        dtype="float32",
        attention="xla",          # vision encoders' attention: xla (exact) | cudnn | auto (cudnn on GPU in bf16)
        fp8=False,                # vision blocks' GEMMs in float8 (bf16 dtype; H100/H200; changes results)
        residual_dtype="float32",  # float32 | bfloat16: the vision encoders' residual stream (changes results)
        gelu="exact",             # exact | tanh: the DINO encoders' GELU (CLIP keeps quick_gelu; changes results)
        seed=0,
    ))
    c.clip_finetune = "qv"        # qv | full | frozen
    # What CLIP's towers and the head's aggregation/decoder blocks recompute in the backward
    # pass instead of keeping: none | activation (the MLP activations) | full (all but each
    # block's input) | dots (all but the weight matmuls' outputs). Memory for time; same results.
    c.remat = "none"
    c.clip_lr_multiplier = 0.01
    c.loss = ml_collections.ConfigDict(dict(kind="bce", release_ignore=False))
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=2.5e-4, weight_decay=1e-4, b1=0.9, b2=0.999, warmup_steps=0, schedule="cosine",
        grad_clip=0.01))

    c.data = ml_collections.ConfigDict(dict(
        root="",                  # folder holding PIE_RGBSAR/, DDSK/, DDCH/, OEM/
        skip_bad_samples=False,   # True: an unreadable sample is replaced by the next one and counted
        crop_size=384,
        short_edge=(),            # () = crop_size; (lo, hi) random shortest edge
        flip=True,
        jitter_prob=0.5,          # photometric jitter on RGB only
        worker_count=0,
        num_records=512, tile_size=128, cache=True,   # synthetic world only
    ))
    c.eval = ml_collections.ConfigDict(dict(batch_size=8, max_tiles=0, num_records=96))
    # Precision of evaluation: "model" (as config.model builds it), "off" (no float8), or
    # float8 in bf16 (H100/H200 speed; changes results): "on" current scaling, "static"
    # scales calibrated on the first fp8_calibration_tiles tiles of fp8_calibration_split.
    c.eval.fp8 = "model"
    c.eval.fp8_calibration_tiles = 8
    c.eval.fp8_calibration_split = "train"
    # Cloud augmentation in the train step: a share `prob` of the tiles gets clouds of
    # one preset per batch (mmovseg_jax/data/clouds.py: thin, big, local, fog, wide).
    c.clouds = ml_collections.ConfigDict(dict(prob=0.0, presets=("thin", "big")))
    # --mode robustness: mIoU of config.model.checkpoint (and an RGB-only baseline model
    # folder) on the test split under clouds of each preset at each forced opacity.
    c.robustness = ml_collections.ConfigDict(dict(
        baseline_checkpoint="", presets=("big",), opacities=(0.0, 0.25, 0.5, 0.75, 1.0), seed=0))

    if setting == "synthetic":
        c.data.crop_size = 128
        c.optimizer.lr = 1e-3
        c.optimizer.warmup_steps = 30
        c.optimizer.grad_clip = 1.0
        # CLIP starts random here, so its towers must learn the class names: all blocks
        # train, at 1/10 of the rate; softmax CE (the paper's loss) pulls the class
        # embeddings apart, where BCE settles on near-identical ones.
        c.total_steps = 400
        c.clip_finetune = "full"
        c.clip_lr_multiplier = 0.1
        c.loss.kind = "ce"
    else:
        c.model.variant = "L" if large else "B"
        c.model.require_pretrained = True
        c.model.dtype = "bfloat16"
        c.model.attention = "auto"  # cuDNN flash attention on a GPU (bf16), XLA elsewhere
        c.total_steps = 120_000
        c.log_every = 100
        c.checkpoint_every = 5000
        c.keep_checkpoints = 3
        c.data.worker_count = 8
        c.eval.num_records = 0
    return c
