"""Settings shared by the Open-Sora 2.0 MMDiT training stages (spec §4: objective, timesteps, text dropout, caption
suffix, optimizer, selective remat, buckets, condition mix)."""

import ml_collections

I2V_MIX = {"t2v": 1.0, "i2v_head": 5.0, "i2v_loop": 1.0, "i2v_tail": 1.0}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = "opensora_v2_0"
    c.seed = 42
    c.out_dir = "outputs/mmdit"
    # Re-running with OUT_DIR resumes from its latest checkpoint; a different config there is refused.
    # resume=False starts over in OUT_DIR instead (its checkpoints and metrics are removed).
    c.resume = True
    # Model: the 11B MMDiT. from_pretrained: a converted 2.0 directory, the reference's safetensors, or Flux.1-dev
    # (fused layout and interleaved RoPE are converted as it loads; its guidance_in is dropped, cond_in starts at 0).
    # The architecture, spelled out so that any field can be overridden (--config.model.depth=2, ...).
    c.model_preset = ""
    c.model = ml_collections.ConfigDict(dict(
        in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
        depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10_000, qkv_bias=True, guidance_embed=False,
        cond_embed=False, fused_qkv=False, use_liger_rope=True, patch_size=2))
    c.from_pretrained = ""
    c.dtype = "bfloat16"  # compute; master weights stay float32
    c.param_dtype = "float32"
    c.remat = "everything"  # per-block policy: everything | dots | nothing
    # The reference's selective checkpointing (double, single): how many leading blocks of each stack use `remat`.
    c.remat_blocks = (8, 100)
    c.attention = "auto"
    c.mesh = ""  # e.g. "fsdp=8", "data=-1,fsdp=8", "fsdp=8,sequence=4" (ring attention over sequence)
    # Frozen encoders (on-the-fly encoding), unless data.features is set.
    c.ae = ""  # Hunyuan VAE checkpoint (converted dir or hunyuan_vae.safetensors)
    c.ae_type = "hunyuan_vae"  # hunyuan_vae | dc_ae
    c.ae_dtype = "bfloat16"
    c.t5 = ""
    c.clip = ""
    c.t5_tokenizer = ""
    c.clip_tokenizer = ""
    c.t5_max_length = 512
    c.text_dtype = "bfloat16"
    c.caption_suffix = True  # append " {fps} FPS, {m} motion score." as the reference trains
    # Data: a CSV of videos/images or precomputed features; buckets by name (v2_stage1, ...) or a dict
    # {resolution: {frames: (keep_prob, batch)}} over the 2.0 training resolution table. Videos faster than
    # fps_max take every ⌈fps / fps_max⌉-th frame (and say that fps in the caption suffix), as the reference.
    c.data = ml_collections.ConfigDict(dict(csv="", features="", resolutions="opensora_v2_0", frame_interval=1,
                                            fps_max=24, num_workers=4))
    c.data.bucket_config = ml_collections.FieldReference("v2_stage1", field_type=object)
    # Objective.
    c.sigma_min = 1e-5
    c.text_dropout = dict(t5=0.31622777, clip=0.31622777)
    c.cond_weights = {"t2v": 1.0}  # per-sample condition mix (i2v stages: I2V_MIX, needs model.cond_embed)
    c.no_i2v_ref_loss = False
    c.optimizer = ml_collections.ConfigDict(dict(lr=5e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-15,
                                                 weight_decay=0.0, grad_clip=1.0))
    c.ema_decay = 0.0  # 0 = no EMA (the reference trains without)
    # LoRA fine-tuning: rank > 0 trains only low-rank adapters on `targets` (default: attention projections).
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=()))
    c.steps = 85000
    c.ckpt_every = 2000
    c.keep_checkpoints = 3
    c.async_checkpoint = True
    c.log_every = 10
    c.export = True  # at the end: the model (or the LoRA adapters) under OUT_DIR
    return c
