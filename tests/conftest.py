"""Test-wide settings: 8 fake CPU devices, no hub access, full-precision matmuls.

These must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def fixtures_root() -> pathlib.Path:
    """Root of the shared reference fixtures (override with OPENSORA_FIXTURES)."""
    env = os.environ.get("OPENSORA_FIXTURES")
    return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Converted tiny random {stdit3, vae, t5} directories (tests/tiny.py), written once per session and
    shared by every module that needs them: tests read them and must not write into them."""
    from tests.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_checkpoints"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    root = fixtures_root()
    if not root.is_dir():
        pytest.fail(f"fixture directory {root} not found; set OPENSORA_FIXTURES")
    return root
