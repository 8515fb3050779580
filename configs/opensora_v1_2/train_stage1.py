"""Open-Sora v1.2 STDiT3 training, stage 1 (spec §8.2–8.5: bucket table, mask ratios, optimizer)."""

from configs.opensora_v1_2.train_common import MASK_RATIOS_STAGE12, MASK_RATIOS_STAGE3, base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/stdit3_stage1"
    c.data.bucket_config = "stage1"
    c.mask_ratios = dict(MASK_RATIOS_STAGE12)
    c.optimizer.warmup_steps = 1000
    return c
