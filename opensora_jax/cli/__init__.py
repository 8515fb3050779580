"""Command-line shells over the library: each module's `main(argv)` parses flags into a config and calls one
library function; `cli` is its console entry point (see `[project.scripts]` in pyproject.toml). These shells,
the tools and `convert` are the only places that turn reference weights into parameters on the fly
(`convert.load_model`); the library below them reads converted checkpoints or takes a loader."""
