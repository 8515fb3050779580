"""Open-Sora 2.0 on Video DC-AE latents (`high_compression.py`): 768px, 128-channel latents, patch 1, frame
buckets 4k, condition mix t2v 1 : i2v_head 7, remat (100, 100)."""

from configs.opensora_v2_0.train_common import base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/mmdit_high_compression"
    c.model.in_channels = 128  # the OpenSora-v2-11B-DC-AE preset: 128-channel latents, patch 1
    c.model.patch_size = 1
    c.model.cond_embed = True
    c.ae_type = "dc_ae"
    c.data.resolutions = "opensora_v2_0_dc_ae"
    c.data.bucket_config = "v2_high_compression"
    c.cond_weights = {"t2v": 1.0, "i2v_head": 7.0}
    c.optimizer.lr = 3e-5
    c.remat_blocks = (100, 100)
    c.ckpt_every = 250
    return c
