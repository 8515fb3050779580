"""Demo VAE, step 1 of 2: the tiny 2D VAE alone, trained as an image autoencoder on the synthetic
shapes' frames (stage 0, ours: the reference starts stage 1 from the pretrained SDXL 2D VAE instead),
with a pixel L2 loss.

    python train_vae.py --config configs/demo/vae_tiny_2d.py --csv DATA/train.csv --out-dir RUN/vae_2d

The exported `RUN/vae_2d/vae_model` (2D VAE trained, temporal VAE still random) is where
configs/demo/vae_tiny.py (stage 1: the temporal VAE on top of this frozen 2D VAE) starts.
"""

from configs.demo.vae_tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.out_dir = "outputs/demo_vae_2d"
    c.stage = 0
    c.mixed_strategy = "none"
    c.data.num_frames = 4  # frames are independent images here: a few per clip, many clips per batch
    c.data.batch_size = 16
    c.loss.use_real_rec_loss = True
    c.loss.use_z_rec_loss = False
    c.loss.use_image_identity_loss = False
    # L2 instead of the reference's L1 (+ LPIPS, whose weights we do not have): with small bright shapes on
    # black, L1 settles on the all-black median for hundreds of steps; L2 draws the shapes within ~300.
    c.loss.pixel_loss = "l2"
    c.optimizer.lr = 1e-3
    c.steps = 600
    c.ckpt_every = 200
    c.log_every = 25
    return c
