"""Shared fixtures: tiny random-weight checkpoints built from configs, saved once per session."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a fresh datasets cache per run: offline, datasets keys a local folder's cache by its name, so a fixture
# rewritten under the same folder name would otherwise come back as last run's rows
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lmms_vg_datasets_")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_vg.demo import tiny


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    return tiny.build_llava(tmp_path_factory.mktemp("llava_qwen2"), family="qwen2")


@pytest.fixture(scope="session")
def qwen2_vl_dir(tmp_path_factory):
    return tiny.build_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="session")
def qwen2_5_vl_dir(tmp_path_factory):
    """Qwen2.5-VL: Lingshu's architecture (window attention in the vision tower)."""
    return tiny.build_qwen2_vl(tmp_path_factory.mktemp("qwen2_5_vl"), kind="qwen2_5_vl")


@pytest.fixture(scope="session")
def qwen3_vl_dir(tmp_path_factory):
    """Qwen3-VL: 16-pixel patches, DeepStack, interleaved M-RoPE."""
    return tiny.build_qwen2_vl(tmp_path_factory.mktemp("qwen3_vl"), kind="qwen3_vl")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture
def images():
    return [random_image(130, 90, 1), random_image(100, 100, 2)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """README's main command, run once for the session: its folder and how long it took."""
    import time

    from lmms_vg import cli

    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    assert cli.main(["demo", "--out", str(out)]) == 0
    return out, time.time() - t0
