"""Open-Sora v1.2 STDiT3 training, stage 3 (spec §8.2–8.5: bucket table, mask ratios, optimizer)."""

from configs.opensora_v1_2.train_common import MASK_RATIOS_STAGE12, MASK_RATIOS_STAGE3, base_config


def get_config():
    c = base_config()
    c.out_dir = "outputs/stdit3_stage3"
    c.data.bucket_config = "stage3"
    c.mask_ratios = dict(MASK_RATIOS_STAGE3)
    c.optimizer.warmup_steps = 1000
    c.steps = 15000
    return c
