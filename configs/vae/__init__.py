"""Open-Sora v1.2 VAE training configs (spec §12). `base_config()` holds the settings every stage shares;
train_stage{1,2,3}.py set the per-stage values of `configs/vae/train/stage{1,2,3}.py` of the reference."""

import ml_collections

from opensora_jax.models.vae.opensora_v1_2 import OPENSORA_VAE_V1_2_PRESET


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.out_dir = "outputs/vae"
    # Re-running with OUT_DIR resumes from its latest checkpoint; a different config there is refused.
    # resume=False starts over in OUT_DIR instead (its checkpoints and metrics are removed).
    c.resume = True
    # Architecture: reference pipeline kwargs (vae_2d / vae_temporal / micro_frame_size ...). Training
    # never chunks (whole clip through both VAEs); micro_frame_size only matters for the exported model.
    c.model = ml_collections.ConfigDict(OPENSORA_VAE_V1_2_PRESET)
    c.from_pretrained = ""  # whole VAE (converted dir or reference weights): stages 2-3
    c.vae_2d_pretrained = ""  # 2D part only (diffusers AutoencoderKL weights): stage 1
    c.allow_pickle = False
    c.temporal_logvar_init = ml_collections.FieldReference(None, field_type=float)  # None: PyTorch's init
    c.dtype = "bfloat16"  # compute; parameters and optimizer state stay float32
    c.micro_batch_size = 0  # 2D VAE frames per chunk (memory only); 0 = all frames at once
    c.stage = 1  # trainable set: 0 2D VAE alone (ours); 1 temporal VAE; 2 + 2D encoder, quant_conv; 3 everything
    c.data = ml_collections.ConfigDict(dict(csv="", num_frames=17, image_size=(256, 256), batch_size=1,
                                            frame_interval=1, num_workers=4))
    c.mixed_strategy = "mixed_video_image"  # or "mixed_video_random", "none"
    c.mixed_image_ratio = 0.2
    c.loss = ml_collections.ConfigDict(dict(perceptual_loss_weight=0.1, kl_loss_weight=1e-6, logvar=0.0,
                                            use_real_rec_loss=False, use_z_rec_loss=True,
                                            use_image_identity_loss=False, log_pixel_loss=True, pixel_loss="l1",
                                            latent_loss="l1"))
    # LPIPS needs local weights: VGG16 features + lin0..lin4 (.npz/.safetensors; .pth with allow_pickle).
    c.lpips = ml_collections.ConfigDict(dict(enabled=False, weights="", allow_pickle=False))
    # Supported by the reference script but unused in v1.2 (no v1.2 config defines a discriminator).
    c.discriminator = ml_collections.ConfigDict(dict(enabled=False, ndf=64, n_layers=3, factor=1.0, start=-1,
                                                     generator_factor=0.5, generator_loss_type="hinge",
                                                     discriminator_loss_type="hinge"))
    # HybridAdam(adamw_mode) defaults: eps 1e-8; lr 1e-5 constant, no weight decay, clip 1.0.
    c.optimizer = ml_collections.ConfigDict(dict(lr=1e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                                                 weight_decay=0.0, grad_clip=1.0))
    c.steps = 380_000
    c.ckpt_every = 1000
    c.keep_checkpoints = 3
    c.async_checkpoint = True
    c.log_every = 1
    c.eval = ml_collections.ConfigDict(dict(csv="", every=0, num_batches=8))
    c.export = True
    return c
