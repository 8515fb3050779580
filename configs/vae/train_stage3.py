r"""Open-Sora v1.2 VAE training, stage 3 (spec §12.2): from stage 2; everything trains; 33 frames at 256²;
mixed_video_random (the first n ~ U{1..33} frames); pixel NLL (L1 + 0.1·LPIPS) + 1e-6·KL.

LPIPS needs local weights (VGG16 features + lin layers): set lpips.weights, e.g.
    python train_vae.py --config configs/vae/train_stage3.py --config.data.csv=videos.csv \
        --config.from_pretrained=outputs/vae_stage2/vae_model --config.lpips.weights=lpips_vgg16.npz
"""

from configs.vae import base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/vae_stage3"
    c.stage = 3
    c.from_pretrained = "outputs/vae_stage2/vae_model"
    c.data.num_frames = 33
    c.mixed_strategy = "mixed_video_random"
    c.loss.use_real_rec_loss = True
    c.loss.use_z_rec_loss = False
    c.loss.use_image_identity_loss = False
    c.lpips.enabled = True
    c.lpips.weights = "pretrained_models/lpips_vgg16.npz"
    c.steps = 540_000
    return c
