"""Open-Sora 2.0 text-to-image pre-training (`configs/diffusion/train/image.py`): 256/768/1024px images."""

from configs.opensora_v2_0.train_common import base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/mmdit_image"
    c.data.bucket_config = "v2_image"
    c.optimizer.lr = 1e-5
    return c
