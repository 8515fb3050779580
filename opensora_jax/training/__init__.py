"""Training: frame-conditioning masks, the rectified-flow loss, optimizer, EMA, checkpoints, the loop."""
