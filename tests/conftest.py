"""Shared fixtures: the real data root, offline Hugging Face, and small seeded tensors."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets: ``$XMR_DATA``, else ``../shared/data`` beside the repository.

    Skipped where neither exists, except under CI (``CI=true``), where a missing data root is an error:
    a CI run must never pass by skipping every test that reads real data.
    """
    root = Path(os.environ.get("XMR_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI run without the real data: {root} does not exist (set XMR_DATA)")
        pytest.skip(f"real data not found at {root}; set XMR_DATA")
    return root


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
