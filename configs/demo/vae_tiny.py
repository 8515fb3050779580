"""A tiny Open-Sora-style VAE trained on the synthetic shapes dataset on a CPU (all three stages' loss
terms that need no external weights: z-space reconstruction, image identity, pixel L1 + KL).

    python -m opensora_jax.data.synthetic /tmp/synth --num-clips 64 --frames 20 --size 32 32
    python train_vae.py --config configs/demo/vae_tiny.py --csv /tmp/synth/train.csv --out-dir /tmp/vae_tiny

Architecture: 2D VAE /8 (widths 16-32-32-32, one ResNet per block, 8 groups) and a temporal VAE /4 in time
(16 filters, one res block per level, 8 groups); 17-frame clips at 32×32 → latents 5×4×4×4. The stage is
3 (everything trains, pixel + KL loss) with the z-space and identity terms added, so the 2D and temporal
VAEs both learn from scratch.

Expect the background first: with L1 on sparse frames (a shape covers ~5-10% of the pixels) and sampled
posteriors, 1000 CPU steps reach roughly the all-black reconstruction (held-out L1 ≈ 0.09 vs 0.98 at
init). The z-space term on a trainable, untrained 2D encoder also pulls the 2D latents towards zero (the
reference only uses it with a pretrained 2D VAE), so drawing the shapes takes much longer than a demo.
"""

import ml_collections

from configs.vae import base_config

TINY_VAE = {
    "micro_frame_size": 17,
    "micro_batch_size": 4,
    "vae_2d": {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
               "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [16, 32, 32, 32],
               "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 8},
    "vae_temporal": {"in_out_channels": 4, "latent_embed_dim": 4, "embed_dim": 4, "filters": 16,
                     "num_res_blocks": 1, "channel_multipliers": [1, 2, 2, 2],
                     "temporal_downsample": [False, True, True], "num_groups": 8, "activation_fn": "swish"},
}


def get_config():
    c = base_config()
    c.seed = 0
    c.out_dir = "outputs/vae_tiny"
    c.model = ml_collections.ConfigDict(TINY_VAE)
    c.dtype = "float32"
    c.stage = 3
    c.data.csv = "data/synthetic/train.csv"
    c.data.num_frames = 17
    c.data.image_size = (32, 32)
    c.data.batch_size = 4
    c.data.num_workers = 0
    c.mixed_strategy = "mixed_video_image"
    c.mixed_image_ratio = 0.2
    c.loss.use_real_rec_loss = True
    c.loss.use_z_rec_loss = True
    c.loss.use_image_identity_loss = True
    c.optimizer.lr = 1e-3
    c.steps = 300
    c.ckpt_every = 100
    c.log_every = 10
    return c
