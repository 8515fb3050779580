"""Settings shared by the Open-Sora v1.2 STDiT3 training stages (spec §8.3–8.5)."""

import ml_collections

MASK_RATIOS_STAGE12 = {
    "random": 0.05, "intepolate": 0.005, "quarter_random": 0.005, "quarter_head": 0.005, "quarter_tail": 0.005,
    "quarter_head_tail": 0.005, "image_random": 0.025, "image_head": 0.05, "image_tail": 0.025,
    "image_head_tail": 0.025,
}
MASK_RATIOS_STAGE3 = {
    "random": 0.01, "intepolate": 0.002, "quarter_random": 0.002, "quarter_head": 0.002, "quarter_tail": 0.002,
    "quarter_head_tail": 0.002, "image_random": 0.0, "image_head": 0.22, "image_tail": 0.005,
    "image_head_tail": 0.005,
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.out_dir = "outputs/stdit3"
    # Re-running with OUT_DIR resumes from its latest checkpoint; a different config there is refused.
    # resume=False starts over in OUT_DIR instead (its checkpoints and metrics are removed).
    c.resume = True
    # Model: STDiT3-XL/2 from a checkpoint (converted dir or reference weights), trained in bfloat16 with
    # float32 master weights and per-block rematerialisation.
    c.model_preset = "STDiT3-XL/2"
    c.model = ml_collections.ConfigDict(dict(qk_norm=True, caption_channels=4096, model_max_length=300))
    c.from_pretrained = ""
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    # Per-block rematerialisation: "everything" (recompute each block in the backward pass; least memory),
    # "dots" (keep the projection/MLP matmul outputs: less recompute, more memory), "nothing" (off).
    # Typed `object` so that configs which still say True / False (everything / nothing) load.
    c.remat = ml_collections.FieldReference("everything", field_type=object)
    c.attention = "auto"  # auto (picks per backend) | blockwise | xla | cudnn | splash: models/attention.py
    c.mesh = ""  # device mesh, e.g. "fsdp=8" or "data=-1,fsdp=8"; empty = one device
    c.freeze_y_embedder = True
    c.only_train_temporal = False
    # Frozen encoders (on-the-fly encoding), unless data.features is set.
    c.vae = ""
    c.vae_dtype = "bfloat16"
    c.t5 = ""
    c.tokenizer = ""
    # bucket_config: a name (stage1/2/3, synthetic) or a {resolution: {frames: (keep_prob, batch)}} dict.
    c.data = ml_collections.ConfigDict(dict(csv="", features="", resolutions="", frame_interval=1, num_workers=4))
    c.data.bucket_config = ml_collections.FieldReference("stage1", field_type=object)
    c.mask_ratios = dict(MASK_RATIOS_STAGE12)
    c.scheduler = ml_collections.ConfigDict(dict(timestep_method="logit-normal", use_timestep_transform=True))
    c.optimizer = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=1000, b1=0.9, b2=0.999, eps=1e-15,
                                                 weight_decay=0.0, grad_clip=1.0))
    c.ema_decay = 0.99
    # LoRA fine-tuning: rank > 0 trains only low-rank adapters on `targets` (default: the attention projections)
    # and exports them to OUT_DIR/lora (sample.py --lora OUT_DIR/lora).
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=()))
    c.steps = 30000
    c.ckpt_every = 200
    c.keep_checkpoints = 3
    c.async_checkpoint = True
    c.log_every = 10
    c.export_ema = True
    return c
