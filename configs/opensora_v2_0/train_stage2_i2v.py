"""Open-Sora 2.0 stage 2, image-to-video (`stage2_i2v.py`): its own buckets and the i2v condition mix."""

from configs.opensora_v2_0.train_common import I2V_MIX
from configs.opensora_v2_0.train_stage2 import get_config as stage2


def get_config():
    c = stage2()
    c.out_dir = "outputs/mmdit_stage2_i2v"
    c.data.bucket_config = "v2_stage2_i2v"
    c.model.cond_embed = True
    c.cond_weights = dict(I2V_MIX)
    return c
