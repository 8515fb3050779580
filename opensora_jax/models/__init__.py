"""Flax NNX models mirroring the Open-Sora reference modules."""
