"""PyTorch → JAX checkpoint converters (one strict engine, one table per model)."""
