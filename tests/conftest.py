"""Shared test fixtures: an isolated installation home and seeded, single-threaded torch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cxr_io.settings import Settings

pytest_plugins = ["tests.mlflow_support"]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own ISNET_CXR_HOME, so no test reads or writes the user's cache/secret.

    The CT cache for the realistic synthetic mode is shared across tests (fetched once) through
    ISNET_CXR_TEST_CACHE, which defaults to a folder under the pytest base temp.
    """
    home = tmp_path_factory.mktemp("isnet_home")
    monkeypatch.setenv("ISNET_CXR_HOME", str(home))
    monkeypatch.delenv("ISNET_CXR_SECRET", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def shared_data_home(monkeypatch) -> Path:
    """ISNET_CXR_HOME pointing at a cache shared by all tests and runs ($ISNET_CXR_TEST_CACHE,
    else <system temp>/isnet-cxr-test-cache), so data fetched from PyPI (the CT, the lung
    shapes) is downloaded once."""
    home = Path(
        os.environ.get("ISNET_CXR_TEST_CACHE")
        or Path(tempfile.gettempdir()) / "isnet-cxr-test-cache"
    )
    monkeypatch.setenv("ISNET_CXR_HOME", str(home))
    return home


@pytest.fixture
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
