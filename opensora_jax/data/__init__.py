"""Training data: the CSV format, sample loading, buckets, the grain loader, stored features, synthetic data.

csv_dataset   CsvDataset, Sample: the reference's training CSV; bad rows skipped and counted
video         load_sample, temporal_crop_indices: one sample → (T, H, W, 3) float32 in [-1, 1]
buckets       Buckets, plan_epoch: (res, T, ar) bucket assignment and the per-epoch batch plan
bucket_configs STAGE1/2/3 of v1.2, and a tiny config for the synthetic data
loader        VideoLoader: batches of one bucket shape each, checkpointable iterator state
features      write_features, FeatureLoader: stored latents + text embeddings
synthetic     make_dataset (and `python -m opensora_jax.data.synthetic`): moving-shape clips

The loader also builds VideoLoaders from bucket-config names (`make_video_loader`).
"""

from opensora_jax.data.buckets import BucketKey, Buckets, EpochPlan, PlannedBatch, plan_epoch
from opensora_jax.data.csv_dataset import CsvDataset, Sample
from opensora_jax.data.features import FeatureLoader, write_features
from opensora_jax.data.loader import EpochIterator, VideoLoader
from opensora_jax.data.video import load_sample, temporal_crop_indices

__all__ = [
    "BucketKey",
    "Buckets",
    "CsvDataset",
    "EpochIterator",
    "EpochPlan",
    "FeatureLoader",
    "PlannedBatch",
    "Sample",
    "VideoLoader",
    "load_sample",
    "plan_epoch",
    "temporal_crop_indices",
    "write_features",
]
