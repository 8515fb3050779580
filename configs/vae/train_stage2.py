r"""Open-Sora v1.2 VAE training, stage 2 (spec §12.2): from stage 1; temporal VAE + 2D encoder and
quant_conv train; 17 frames at 256²; mixed_video_image 0.2; z-space reconstruction loss only.

    python train_vae.py --config configs/vae/train_stage2.py --config.data.csv=videos.csv \
        --config.from_pretrained=outputs/vae_stage1/vae_model
"""

from configs.vae import base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/vae_stage2"
    c.stage = 2
    c.from_pretrained = "outputs/vae_stage1/vae_model"
    c.data.num_frames = 17
    c.mixed_strategy = "mixed_video_image"
    c.mixed_image_ratio = 0.2
    c.loss.use_real_rec_loss = False
    c.loss.use_z_rec_loss = True
    c.loss.use_image_identity_loss = False
    c.steps = 260_000
    return c
