"""opensora-jax: Open-Sora in JAX / Flax NNX.

Public layout convention: every video tensor crossing a public API is channels-last,
(B, T, H, W, C). The reference's (B, C, T, H, W) appears only in `convert/` and in
`opensora_jax.tools.parity`, which talk to PyTorch-produced data.
"""

__version__ = "0.1.0"
