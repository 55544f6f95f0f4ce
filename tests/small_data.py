"""The small datasets and quick settings the tests train the three programs with.

Each dataset has the real file's shape (columns, folder layout, archive format) and is small
enough that a 2-process run takes seconds; tests/conftest.py serves each as a fixture
(``housing_data``, ``cifar_data``, ``anomaly_data``). A test that needs a variant (a damaged
file, another size) calls the builder here itself.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from anomaly.data import TRAIN_FILE
from anomaly.synthetic import make_partition, write_partition
from cifar import data as cdata

# --- housing ---------------------------------------------------------------------------------

# A quick housing run: 3 epochs of 5 steps on the synthetic frame, a narrow network.
HOUSING_SMALL = [
    "--epochs",
    "3",
    "--batch-size",
    "96",
    "--width",
    "64",
    "--depth",
    "2",
    "--n-clusters",
    "8",
    "--no-baselines",
]


def synthetic_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """Rows shaped like housing.csv: price driven by income and location, capped at $500,001."""
    rng = np.random.default_rng(seed)
    lon, lat = rng.uniform(-124, -114, n), rng.uniform(32.5, 42, n)
    households = rng.integers(50, 1500, n).astype(float)
    rooms = households * rng.uniform(3, 7, n)
    bedrooms = rooms * rng.uniform(0.15, 0.3, n)
    income = rng.uniform(0.5, 15, n)
    price = 40_000 + 30_000 * income + 80_000 * np.exp(-((lon + 122) ** 2 + (lat - 37.5) ** 2))
    frame = pd.DataFrame(
        {
            "longitude": lon.round(2),
            "latitude": lat.round(2),
            "housing_median_age": rng.integers(1, 53, n).astype(float),
            "total_rooms": rooms.round(),
            "total_bedrooms": bedrooms.round(),
            "population": (households * rng.uniform(2, 4, n)).round(),
            "households": households,
            "median_income": income.round(4),
            "median_house_value": np.clip(price * rng.uniform(0.85, 1.15, n), 14_999, 500_001).round(-2),
            "ocean_proximity": rng.choice(["<1H OCEAN", "INLAND", "NEAR OCEAN", "NEAR BAY"], n),
        }
    )
    frame.loc[rng.choice(n, 10, replace=False), "total_bedrooms"] = np.nan
    return frame


def write_housing(folder: Path, n: int = 600, seed: int = 0) -> Path:
    """``folder`` holding a synthetic housing.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    synthetic_frame(n, seed).to_csv(folder / "housing.csv", index=False)
    return folder


# --- cifar -----------------------------------------------------------------------------------

CLASSES = ("cat", "dog", "ship")
# A quick cifar run: a narrow airnet, small evaluation batches, no download.
CIFAR_SMALL = ["--widths", "8", "16", "16", "--eval-batch-size", "4", "--no-download"]


def _image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 RGB image whose colour says its class, plus noise (learnable in one epoch)."""
    base = np.zeros((32, 32, 3), dtype=np.float64)
    base[..., label] = 180
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def make_folders(root: Path, n_train: int = 12, n_test: int = 7, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/*.png``: an image-folder dataset of the three CLASSES."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_image(label, rng)).save(folder / f"{i:04d}.png")
    return root


def make_batches_archive(path: Path, n: int = 4) -> bytes:
    """A tiny archive in torchvision's cifar-10-python.tar.gz format; returns its bytes."""
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        names = [*cdata.TRAIN_BATCHES, cdata.TEST_BATCH]
        for name in names:
            blob = pickle.dumps(
                {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
            )
            info = tarfile.TarInfo(f"{cdata.BATCHES_DIR}/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


# --- anomaly ---------------------------------------------------------------------------------

# A quick anomaly run: 3 epochs, small networks, rare categorical levels folded early.
ANOMALY_SMALL = [
    "--epochs",
    "3",
    "--batch-size",
    "48",
    "--hidden",
    "32,8",
    "--classifier-hidden",
    "32",
    "--min-frequency",
    "5",
]


def write_anomaly(folder: Path, n: int = 3000, seed: int = 3) -> Path:
    """``folder`` holding ``n`` synthetic flows as the zipped training partition (BOM header)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_partition(make_partition(n, seed=seed), folder / TRAIN_FILE, zip_name="unsw.zip")
    return folder
