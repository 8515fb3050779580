"""Open-Sora 2.0 stage 1 (`configs/diffusion/train/stage1.py`): 256px text-to-video up to 129 frames, plus
768/1024px images; remat (8, 100)."""

from configs.opensora_v2_0.train_common import base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/mmdit_stage1"
    c.data.bucket_config = "v2_stage1"
    c.optimizer.lr = 5e-5
    c.remat_blocks = (8, 100)
    return c
