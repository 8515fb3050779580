r"""Open-Sora v1.2 VAE training, stage 1 (spec §12.2): 2D VAE frozen (PixArt-Σ SDXL VAE), temporal VAE
from scratch; 17 frames at 256²; mixed_video_image 0.2; z-space reconstruction + image identity loss.

    python train_vae.py --config configs/vae/train_stage1.py --config.data.csv=videos.csv \
        --config.vae_2d_pretrained=pixart_sigma_sdxlvae/vae/diffusion_pytorch_model.safetensors
"""

from configs.vae import base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/vae_stage1"
    c.stage = 1
    c.data.num_frames = 17
    c.mixed_strategy = "mixed_video_image"
    c.mixed_image_ratio = 0.2
    c.loss.use_real_rec_loss = False
    c.loss.use_z_rec_loss = True
    c.loss.use_image_identity_loss = True
    c.steps = 380_000
    return c
