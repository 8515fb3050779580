"""A tiny STDiT3 trained on the synthetic shapes dataset on a laptop CPU (python -m opensora_jax.data.synthetic)."""

import ml_collections

from configs.opensora_v1_2.train_common import MASK_RATIOS_STAGE12, base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/demo_tiny"
    c.model_preset = ""
    c.model = ml_collections.ConfigDict(dict(depth=2, hidden_size=64, num_heads=4, caption_channels=32,
                                             model_max_length=16, qk_norm=True))
    c.dtype = "float32"
    c.remat = "nothing"  # everything | dots | nothing (see train_common.py)
    c.vae_dtype = "float32"
    c.data.csv = "data/synthetic/train.csv"
    c.data.bucket_config = "synthetic"
    c.data.resolutions = "synthetic"
    c.data.num_workers = 0
    c.mask_ratios = dict(MASK_RATIOS_STAGE12)
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.steps = 200
    c.ckpt_every = 50
    c.log_every = 10
    return c
