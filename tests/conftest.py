"""Shared fixtures: offline environment, a tiny Wan I2V config, and its saved weights."""

import os

# Never reach a hub; run DeepSpeed on its CPU accelerator (../shared/STACK.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="session")
def tiny_transformer_config() -> dict:
    """The transformer section of conf/model/tiny.yaml (so tests and the demo share one size)."""
    return dict(yaml.safe_load((CONF / "model" / "tiny.yaml").read_text())["transformer"])


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, tiny_transformer_config) -> Path:
    """A random tiny Wan I2V transformer saved in diffusers layout (<dir>/transformer/)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**tiny_transformer_config)
    root = tmp_path_factory.mktemp("wan_tiny")
    model.save_pretrained(root / "transformer")
    return root
