"""Open-Sora 2.0 stage 2 (`stage2.py`): 256px and 768px text-to-video up to 129 frames, full remat (100, 100),
sequence parallelism for 768px (the reference: ring attention over 4 ranks; here mesh "…,sequence=4")."""

from configs.opensora_v2_0.train_common import base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/mmdit_stage2"
    c.data.bucket_config = "v2_stage2"
    c.optimizer.lr = 5e-5
    c.remat_blocks = (100, 100)
    c.mesh = "data=-1,sequence=4"
    return c
