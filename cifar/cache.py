"""CIFAR-10 decoded once: a uint8 tensor file beside the data (or in the user's cache folder).

Decoding 60,000 images takes seconds, not minutes, but is still done once: the result is saved as
one uint8 tensor file (about 185 MB) keyed by the size and modification time of every file it is
read from, in the data dir when it is writable, else in ``$XDG_CACHE_HOME/torchdist-reference``
(``~/.cache``).
Later runs load it in well under a second. When the data dir holds no CIFAR-10 at all, the
canonical ``cifar-10-python.tar.gz`` is downloaded into it first (``common.files.verified_download``:
a temporary file, SHA-256 checked, then renamed into place) unless ``download=False``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cifar.sources import ARCHIVE_NAME, EXPECTED_LAYOUT, Source, decode_source, find_source
from common.errors import UserError
from common.files import torch_save_atomic, verified_download, writable_dir

# torchvision's canonical source (what ``CIFAR10(download=True)`` fetches); the environment
# variables exist so tests can point at a local server.
DOWNLOAD_URL = os.environ.get("CIFAR10_URL", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
DOWNLOAD_SHA256 = os.environ.get("CIFAR10_SHA256", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")
CACHE_VERSION = 1  # bump when the cache layout changes


@dataclass(frozen=True)
class CifarData:
    """The whole dataset in memory: images uint8 [N, 3, 32, 32], labels int64 [N]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str  # the file or folder it was decoded from

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def download_archive(
    data_dir: Path, url: str | None = None, sha256: str | None = None, timeout_s: float = 60.0
) -> Path:
    """Fetch ``cifar-10-python.tar.gz`` into ``data_dir`` (``common.files.verified_download``).

    On any failure the temporary file is removed and a UserError says where to get the file.
    """
    url = url or DOWNLOAD_URL
    sha256 = sha256 or DOWNLOAD_SHA256
    data_dir = Path(data_dir)
    hint = (
        f"--data-dir {data_dir} holds no CIFAR-10: download {url} yourself into it, or pass "
        f"--data-dir a folder holding {EXPECTED_LAYOUT}"
    )
    return verified_download(url, data_dir / ARCHIVE_NAME, sha256, hint=hint, timeout_s=timeout_s)


def _fingerprint(source: Source) -> str:
    """Cheap identity of a source: its path, and the size and modification time of every file
    it is read from (the archive, the batch files, or each image of the class folders: an image
    replaced in place changes neither its folder's size nor its time)."""
    if source.kind == "archive":
        paths, named_from = [source.path], source.path.parent
    elif source.kind == "batches":
        paths, named_from = sorted(source.path.iterdir()), source.path
    else:
        splits = [source.path / s for s in ("train", "test") if (source.path / s).is_dir()]
        paths, named_from = sorted(p for s in splits for p in s.rglob("*") if p.is_file()), source.path
    parts = [str(CACHE_VERSION), source.kind, str(source.path.resolve())]
    for p in paths:
        st = p.stat()
        parts.append(f"{p.relative_to(named_from)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_dirs(data_dir: Path) -> list[Path]:
    """Where a cache may live, in order of preference (the first writable one is used)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [Path(data_dir), Path(xdg) / "torchdist-reference"]


def cache_path(data_dir: Path, source: Source) -> Path | None:
    """The existing cache file for ``source``, else where to write one (None: nowhere)."""
    name = f"cifar10-{source.kind}-{_fingerprint(source)}.pt"
    candidates = [d / name for d in cache_dirs(data_dir)]
    for c in candidates:
        if c.is_file():
            return c
    return next((c for c in candidates if writable_dir(c.parent)), None)


def _read_cache(path: Path) -> dict | None:
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt, not fatal
        return None
    ok = (
        isinstance(cached, dict)
        and cached.get("version") == CACHE_VERSION
        and cached["train_images"].dtype == torch.uint8
    )
    return cached if ok else None


def _write_cache(path: Path, decoded: dict) -> None:
    blob = {
        "version": CACHE_VERSION,
        "train_images": decoded["train"][0],
        "train_labels": decoded["train"][1],
        "test_images": decoded["test"][0],
        "test_labels": decoded["test"][1],
        "classes": list(decoded["classes"]),
        "source": decoded["source"],
    }
    if not writable_dir(path.parent):
        return
    try:
        torch_save_atomic(path, blob)  # nodes sharing a filesystem may write it at once: fine
    except OSError:
        pass  # a cache is an optimisation: failing to write one is fine


def load(data_dir: Path, download: bool = True, workers: int = 2) -> CifarData:
    """The dataset in ``data_dir``: read from its decoded cache, or found (downloaded first when
    absent and ``download``), decoded and cached for the next call.

    Cheap to call again once it succeeded, which is what ``common.agree.on_local_rank_zero_first``
    needs: the first call on a node builds the cache, the node's other ranks read it.
    Raises UserError on missing or bad data.
    """
    data_dir = Path(data_dir)
    source = find_source(data_dir)
    if source is None:
        if not download:
            raise UserError(
                f"--data-dir {data_dir}: no CIFAR-10 found; expected {EXPECTED_LAYOUT}"
                " (or drop --no-download to fetch it)"
            )
        source = Source("archive", download_archive(data_dir))
    path = cache_path(data_dir, source)
    if path is not None and path.is_file():
        cached = _read_cache(path)
        if cached is not None:
            return _from_cache(cached)
    decoded = decode_source(source, workers)
    if path is not None:
        _write_cache(path, decoded)
    return to_dataset(decoded)


def to_dataset(decoded: dict) -> CifarData:
    """``decode_source``'s dict as a CifarData."""
    return CifarData(
        decoded["train"][0],
        decoded["train"][1],
        decoded["test"][0],
        decoded["test"][1],
        tuple(decoded["classes"]),
        decoded["source"],
    )


def _from_cache(cached: dict) -> CifarData:
    return CifarData(
        cached["train_images"],
        cached["train_labels"],
        cached["test_images"],
        cached["test_labels"],
        tuple(cached["classes"]),
        cached["source"],
    )


def load_cache(path: Path) -> CifarData:
    """The dataset from a cache file ``load`` wrote; a UserError if it is unreadable."""
    cached = _read_cache(path)
    if cached is None:
        raise UserError(f"{path}: the decoded CIFAR-10 cache is missing or unreadable; delete it and run again")
    return _from_cache(cached)
