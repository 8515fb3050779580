"""PyTorch → JAX checkpoint converters (one strict engine, one table per model).

`convert.load_model(name, path, ...)` loads a model from a converted directory or straight from the reference's
weights; the CLIs hand it to the library's pipelines and trainers as their checkpoint loader.
"""

from convert.registry import load_model

__all__ = ["load_model"]
