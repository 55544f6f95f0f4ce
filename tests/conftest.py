"""Fixtures every test module may ask for: one small dataset per program (tests/small_data.py).

The housing and anomaly folders are built once per module and must not be changed by a test
(copy one first); the cifar folder is built for each test, since tests damage it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.small_data import make_folders, write_anomaly, write_housing


@pytest.fixture(scope="module")
def housing_data(tmp_path_factory) -> Path:
    """A folder holding a synthetic housing.csv (600 rows, the real file's columns)."""
    return write_housing(tmp_path_factory.mktemp("housing-data"))


@pytest.fixture
def cifar_data(tmp_path: Path) -> Path:
    """An image-folder CIFAR stand-in: train/ and test/, three classes of 32x32 PNGs."""
    return make_folders(tmp_path / "data")


@pytest.fixture(scope="module")
def anomaly_data(tmp_path_factory) -> Path:
    """A folder holding 3,000 synthetic flows as the zipped UNSW-NB15 training partition."""
    return write_anomaly(tmp_path_factory.mktemp("anomaly-data"))
