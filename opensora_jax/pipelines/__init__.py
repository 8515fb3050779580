"""Sampling pipelines, one module per family (`opensora_v1_2`), what they share (`common`), and the
config-driven run that drives any of them (`run`)."""
