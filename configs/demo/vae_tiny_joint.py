"""Demo VAE, step 3 of 3: the whole tiny VAE fine-tuned on pixels — the reference's VAE stage 3
(everything trains, pixel reconstruction + KL), with the L2 pixel loss of step 1.

    python train_vae.py --config configs/demo/vae_tiny_joint.py --csv DATA/train.csv \
        --config.from_pretrained=RUN/vae_temporal/vae_model --out-dir RUN/vae_joint

After step 2 the temporal VAE reproduces the 2D latents only roughly, and the 2D decoder, trained on
exact latents, turns those small errors into artefacts; here the 2D decoder learns to read the temporal
VAE's output.
"""

from configs.demo.vae_tiny import get_config as temporal_config


def get_config():
    c = temporal_config()
    c.out_dir = "outputs/demo_vae_joint"
    c.stage = 3
    c.temporal_logvar_init = None  # continues from step 2
    c.loss.use_real_rec_loss = True
    c.loss.use_z_rec_loss = False
    c.loss.use_image_identity_loss = False
    c.loss.pixel_loss = "l2"
    c.optimizer.lr = 1e-3
    c.steps = 200
    c.ckpt_every = 100
    return c
