"""Open-Sora 2.0 stage 1, image-to-video (`stage1_i2v.py`): stage 1's buckets with the condition mix
t2v 1 : i2v_head 5 : i2v_loop 1 : i2v_tail 1 (needs cond_embed)."""

from configs.opensora_v2_0.train_common import I2V_MIX
from configs.opensora_v2_0.train_stage1 import get_config as stage1


def get_config():
    c = stage1()
    c.out_dir = "outputs/mmdit_stage1_i2v"
    c.data.bucket_config = "v2_stage1_i2v"
    c.model.cond_embed = True
    c.cond_weights = dict(I2V_MIX)
    c.optimizer.lr = 1e-5
    return c
