"""CIFAR-10 from raw files to uint8 tensors (decoded once, cached), and augmentation on the batch.

Sources, looked for in ``--data-dir`` in this order:
1. torchvision's ``cifar-10-batches-py/`` folder (``data_batch_1..5``, ``test_batch``);
2. images in class folders, ``{train,test}/<class>/*.png|jpg``, in the data dir itself or in one
   sub-folder of it (e.g. an extracted ``cifar10-jpg/``);
3. a ``.tar.gz`` / ``.tgz`` in the data dir holding either of the above (read as a stream, never
   extracted), e.g. ``cifar10-jpg.tar.gz`` or torchvision's ``cifar-10-python.tar.gz``;
4. otherwise the canonical ``cifar-10-python.tar.gz`` is downloaded into the data dir (to a
   temporary file, SHA-256 checked, then renamed into place) unless ``download=False``.

Decoding 60,000 images takes seconds, not minutes, but is still done once: the result is saved as
one uint8 tensor file (about 185 MB) keyed by the source's path, size and modification time, in
the data dir when it is writable, else in ``$XDG_CACHE_HOME/torchdist-reference`` (``~/.cache``).
Later runs load it in well under a second.

Augmentation works on a whole batch already on the device (random translate with reflect padding,
horizontal flip, cutout) with an explicit generator, so the GPU never waits for a CPU loader and a
resumed run draws the same numbers.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
import tarfile
import tempfile
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.errors import UserError

# torchvision's canonical source (what ``CIFAR10(download=True)`` fetches); the environment
# variables exist so tests can point at a local server.
DOWNLOAD_URL = os.environ.get("CIFAR10_URL", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
DOWNLOAD_SHA256 = os.environ.get(
    "CIFAR10_SHA256", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SIZE = 32  # pixels, height = width
CACHE_VERSION = 1  # bump when the cache layout changes

# Per-channel statistics of the CIFAR-10 training set (on 0..1 pixels), for input normalisation.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

EXPECTED_LAYOUT = (
    f"{BATCHES_DIR}/ (data_batch_1..5, test_batch), or class folders train/<class>/*.png|jpg and "
    "test/<class>/*.png|jpg (directly or in one sub-folder), or a .tar.gz holding either"
)


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


@dataclass(frozen=True)
class Source:
    kind: str  # "batches", "folders", "archive"
    path: Path


# ---------------------------------------------------------------------------------------------
# Finding the data
# ---------------------------------------------------------------------------------------------

def _class_folder_root(directory: Path) -> Path | None:
    """``directory`` or its single sub-folder that holds ``train/`` and ``test/``, else None."""
    if (directory / "train").is_dir() or (directory / "test").is_dir():
        return directory
    subdirs = [d for d in sorted(directory.iterdir()) if d.is_dir() and d.name != BATCHES_DIR]
    for sub in subdirs:
        if (sub / "train").is_dir() and (sub / "test").is_dir():
            return sub
    return None


def find_source(data_dir: Path) -> Source | None:
    """The first CIFAR-10 source in ``data_dir`` (see the module docstring), or None."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file; expected a folder holding {EXPECTED_LAYOUT}")
    if not data_dir.is_dir():
        return None
    if (data_dir / BATCHES_DIR).is_dir():
        return Source("batches", data_dir / BATCHES_DIR)
    root = _class_folder_root(data_dir)
    if root is not None:
        return Source("folders", root)
    archives = sorted(p for p in data_dir.iterdir()
                      if p.is_file() and p.name.endswith((".tar.gz", ".tgz")))
    # Prefer an archive whose name says CIFAR; others (of other datasets) are only a fallback.
    archives.sort(key=lambda p: "cifar" not in p.name.lower())
    for archive in archives:
        if _archive_kind(archive) is not None:
            return Source("archive", archive)
    return None


def _archive_kind(archive: Path) -> str | None:
    """Peek at the first members: "batches", "folders", or None (not CIFAR-like)."""
    try:
        with tarfile.open(archive, "r:*") as tf:
            for i, member in enumerate(tf):
                parts = member.name.split("/")
                if BATCHES_DIR in parts:
                    return "batches"
                if "train" in parts or "test" in parts:
                    return "folders"
                if i > 50:
                    return None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{archive}: not a readable .tar.gz ({err}); expected an archive holding "
                        f"{EXPECTED_LAYOUT}") from None
    return None


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def _decode_image(data: bytes | Path, name: str) -> np.ndarray:
    """One image -> uint8 [3, 32, 32]; a UserError naming the file if it is not a 32x32 image."""
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:
            img.load()  # raises on truncated or corrupt data
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise UserError(f"{name}: image is {img.size[0]}x{img.size[1]} pixels; "
                                f"expected {IMAGE_SIZE}x{IMAGE_SIZE} (CIFAR-10)")
            array = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise UserError(f"{name}: corrupt or truncated image ({err}); expected a readable "
                        "32x32 PNG or JPEG") from None
    return array.transpose(2, 0, 1)


def _decode_all(items: list[tuple[bytes | Path, str]], workers: int) -> torch.Tensor:
    """Decode many images with a few threads (Pillow releases the GIL while decoding)."""
    if not items:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    chunk = max(1, len(items) // (4 * workers) + 1)
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]

    def decode_chunk(part: list[tuple[bytes | Path, str]]) -> np.ndarray:
        return np.stack([_decode_image(data, name) for data, name in part])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(decode_chunk, chunks))
    return torch.from_numpy(np.concatenate(arrays))


def _split_classes(where: str, split_classes: dict[str, dict[str, list]]) -> tuple[str, ...]:
    """Check the train/test class folders agree and are not empty; return the class names."""
    for split in ("train", "test"):
        if split not in split_classes:
            raise UserError(f"{where}: no {split}/ folder with class sub-folders; expected "
                            f"{split}/<class>/*.png|jpg (layout: {EXPECTED_LAYOUT})")
        classes = split_classes[split]
        if len(classes) < 2:
            raise UserError(f"{where}/{split}: found {len(classes)} class folder(s) with images; "
                            f"expected one folder per class, {split}/<class>/*.png|jpg")
        for name, files in classes.items():
            if not files:
                raise UserError(f"{where}/{split}/{name}: no .png/.jpg images; expected "
                                f"{split}/<class>/*.png|jpg")
    train, test = sorted(split_classes["train"]), sorted(split_classes["test"])
    if train != test:
        raise UserError(f"{where}: train/ has classes {train} but test/ has {test}; "
                        "expected the same class folders in both")
    return tuple(train)


def _labelled(split_classes: dict[str, list], classes: tuple[str, ...]) -> tuple[list, torch.Tensor]:
    items, labels = [], []
    for index, name in enumerate(classes):
        for item in sorted(split_classes[name], key=lambda x: x[1]):
            items.append(item)
            labels.append(index)
    return items, torch.tensor(labels, dtype=torch.int64)


def _stray_images(where: str, paths: Iterable[str]) -> None:
    for p in paths:
        if p.lower().endswith(IMAGE_SUFFIXES):
            raise UserError(f"{where}: image {p} is not inside a class folder; expected "
                            "{train,test}/<class>/<image> (wrong folder layout)")


def _load_folders(root: Path, workers: int) -> tuple[dict, tuple[str, ...]]:
    split_classes: dict[str, dict[str, list]] = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        _stray_images(str(split_dir), (p.name for p in split_dir.iterdir() if p.is_file()))
        split_classes[split] = {
            d.name: [(p, str(p)) for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            for d in sorted(split_dir.iterdir()) if d.is_dir()
        }
    classes = _split_classes(str(root), split_classes)
    return _decode_splits(split_classes, classes, workers), classes


def _decode_splits(split_classes: dict, classes: tuple[str, ...], workers: int) -> dict:
    out = {}
    for split in ("train", "test"):
        items, labels = _labelled(split_classes[split], classes)
        out[split] = (_decode_all(items, workers), labels)
    return out


def _load_archive_folders(archive: Path, workers: int) -> tuple[dict, tuple[str, ...]]:
    """Class-folder images inside a tar.gz, read in one streaming pass (no extraction)."""
    split_classes: dict[str, dict[str, list]] = {}
    stray: list[str] = []
    try:
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                parts = member.name.split("/")
                if not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith("."):
                    continue
                if len(parts) >= 3 and parts[-3] in ("train", "test"):
                    data = tf.extractfile(member).read()
                    split_classes.setdefault(parts[-3], {}).setdefault(parts[-2], []).append(
                        (data, f"{archive}:{member.name}"))
                else:
                    stray.append(member.name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise UserError(f"{archive}: truncated or corrupt archive ({err}); expected a complete "
                        f".tar.gz holding {EXPECTED_LAYOUT}") from None
    _stray_images(str(archive), stray)
    classes = _split_classes(str(archive), split_classes)
    return _decode_splits(split_classes, classes, workers), classes


def _latin1_encode(text: str, encoding: str) -> bytes:
    """What a protocol-2 pickle calls to rebuild ``bytes`` (``_codecs.encode(text, 'latin1')``)."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RefusedGlobal(pickle.UnpicklingError):
    """A batch file named a class or function that CIFAR-10 batches never hold."""


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: no code from the file runs.

    A batch is a dict of str/bytes keys, a uint8 NumPy array, and lists of ints, bytes and str.
    Pickle rebuilds objects by calling the functions the file names; this unpickler resolves
    only the names a NumPy array needs (Python 2's pickles, as distributed, and those of
    today's NumPy), so a doctored file that names ``os.system`` is refused before anything runs.
    """

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy.core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("numpy._core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def unpickle_batch(raw: bytes) -> object:
    """One ``cifar-10-batches-py`` file's content, through ``BatchUnpickler``."""
    return BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()


def _unpickle_batches(read: Callable[[str], bytes | None], where: str) -> tuple[dict, tuple[str, ...]]:
    """torchvision's pickled batches (``read(name)`` returns a file's bytes or None)."""
    def unpickle(name: str, raw: bytes) -> object:
        try:
            return unpickle_batch(raw)
        except _RefusedGlobal as err:
            raise UserError(f"{where}/{name}: refused to load: it names {err}, which a CIFAR-10 "
                            "batch never holds, and unpickling it could run code; expected "
                            f"torchvision's {BATCHES_DIR} files") from None
        except Exception as err:  # noqa: BLE001 - any other failure means the file is damaged
            raise UserError(f"{where}/{name}: unreadable CIFAR-10 batch ({type(err).__name__}: "
                            f"{err}); expected torchvision's pickled batch format") from None

    def load(name: str) -> dict:
        raw = read(name)
        if raw is None:
            raise UserError(f"{where}: {name} is missing; expected {', '.join(TRAIN_BATCHES)}, "
                            f"{TEST_BATCH} and batches.meta (torchvision's {BATCHES_DIR})")
        batch = unpickle(name, raw)
        try:
            if not isinstance(batch["data"], np.ndarray) or batch["data"].dtype != np.uint8:
                raise TypeError("'data' is not a uint8 array")
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
            labels = np.asarray(batch["labels"], dtype=np.int64)
        except Exception as err:  # noqa: BLE001 - any failure means the file is damaged
            raise UserError(f"{where}/{name}: unreadable CIFAR-10 batch ({type(err).__name__}: "
                            f"{err}); expected torchvision's pickled batch format") from None
        if len(labels) != len(data):
            raise UserError(f"{where}/{name}: {len(data)} images but {len(labels)} labels")
        return {"data": data, "labels": labels}

    meta_raw = read("batches.meta")
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    if meta_raw:
        meta = unpickle("batches.meta", meta_raw)
        if not isinstance(meta, dict) or not all(isinstance(c, str) for c in meta.get("label_names", [0])):
            raise UserError(f"{where}/batches.meta: no 'label_names' list of strings; expected "
                            f"torchvision's {BATCHES_DIR} files")
        classes = tuple(meta["label_names"])
    train = [load(name) for name in TRAIN_BATCHES]
    test = load(TEST_BATCH)
    out = {
        "train": (torch.from_numpy(np.concatenate([b["data"] for b in train])),
                  torch.from_numpy(np.concatenate([b["labels"] for b in train]))),
        "test": (torch.from_numpy(test["data"]), torch.from_numpy(test["labels"])),
    }
    for split, (_, labels) in out.items():
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise UserError(f"{where}: {split} labels outside 0..{len(classes) - 1}")
    return out, classes


def _load_batches_dir(directory: Path) -> tuple[dict, tuple[str, ...]]:
    def read(name: str) -> bytes | None:
        path = directory / name
        return path.read_bytes() if path.is_file() else None

    return _unpickle_batches(read, str(directory))


def _load_archive_batches(archive: Path) -> tuple[dict, tuple[str, ...]]:
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                parts = member.name.split("/")
                if member.isfile() and len(parts) >= 2 and parts[-2] == BATCHES_DIR:
                    files[parts[-1]] = tf.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise UserError(f"{archive}: truncated or corrupt archive ({err}); expected "
                        f"torchvision's {ARCHIVE_NAME}") from None
    return _unpickle_batches(files.get, f"{archive}:{BATCHES_DIR}")


def decode_source(source: Source, workers: int = 2) -> dict:
    """Decode ``source`` into ``{"train": (images, labels), "test": ..., "classes": ...}``."""
    if source.kind == "batches":
        splits, classes = _load_batches_dir(source.path)
    elif source.kind == "folders":
        splits, classes = _load_folders(source.path, workers)
    elif _archive_kind(source.path) == "batches":
        splits, classes = _load_archive_batches(source.path)
    else:
        splits, classes = _load_archive_folders(source.path, workers)
    return {"train": splits["train"], "test": splits["test"], "classes": classes,
            "source": str(source.path)}


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_archive(data_dir: Path, url: str | None = None, sha256: str | None = None,
                     timeout_s: float = 60.0) -> Path:
    """Fetch ``cifar-10-python.tar.gz`` into ``data_dir``: temp file, SHA-256 check, rename.

    On any failure the temporary file is removed and a UserError says where to get the file.
    """
    url = url or DOWNLOAD_URL
    sha256 = sha256 or DOWNLOAD_SHA256
    data_dir = Path(data_dir)
    target = data_dir / ARCHIVE_NAME
    how = (f"download {url} yourself into {data_dir}, or pass --data-dir a folder holding "
           f"{EXPECTED_LAYOUT}")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not _writable_dir(data_dir):
            raise PermissionError(13, "folder is read-only")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{ARCHIVE_NAME}.", suffix=".part", dir=data_dir)
    except OSError as err:
        raise UserError(f"--data-dir {data_dir}: no CIFAR-10 there and cannot download into it "
                        f"({err.strerror}); {how}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        got = sha256_of(tmp)
        if got != sha256:
            raise UserError(f"{url}: downloaded file has SHA-256 {got}, expected {sha256} "
                            f"(corrupt or changed download); {how}")
        os.replace(tmp, target)
    except UserError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as err:  # URLError/HTTPError/timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise UserError(f"--data-dir {data_dir}: no CIFAR-10 there and the download from {url} "
                        f"failed ({err}); {how}") from None
    return target


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

def _fingerprint(source: Source) -> str:
    """Cheap identity of a source: path plus size and mtime of the archive, of the batch files,
    or of the split and class folders (which change when images are added or removed)."""
    if source.kind == "archive":
        paths = [source.path]
    elif source.kind == "batches":
        paths = sorted(source.path.iterdir())
    else:
        splits = [source.path / s for s in ("train", "test") if (source.path / s).is_dir()]
        paths = splits + sorted(d for s in splits for d in s.iterdir() if d.is_dir())
    parts = [str(CACHE_VERSION), source.kind, str(source.path.resolve())]
    for p in paths:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_dirs(data_dir: Path) -> list[Path]:
    """Where a cache may live, in order of preference (the first writable one is used)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [Path(data_dir), Path(xdg) / "torchdist-reference"]


def _writable_dir(path: Path) -> bool:
    """A folder we may write to. Its mode bits count too: root passes ``os.access`` even for a
    folder marked read-only (such as a shared, read-only data folder), which must stay untouched."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK) and bool(path.stat().st_mode & 0o222)


def cache_path(data_dir: Path, source: Source) -> Path | None:
    """The existing cache file for ``source``, else where to write one (None: nowhere)."""
    name = f"cifar10-{source.kind}-{_fingerprint(source)}.pt"
    candidates = [d / name for d in cache_dirs(data_dir)]
    for c in candidates:
        if c.is_file():
            return c
    return next((c for c in candidates if _writable_dir(c.parent)), None)


def _read_cache(path: Path) -> dict | None:
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt, not fatal
        return None
    ok = (isinstance(cached, dict) and cached.get("version") == CACHE_VERSION
          and cached["train_images"].dtype == torch.uint8)
    return cached if ok else None


def _write_cache(path: Path, decoded: dict) -> None:
    blob = {
        "version": CACHE_VERSION,
        "train_images": decoded["train"][0], "train_labels": decoded["train"][1],
        "test_images": decoded["test"][0], "test_labels": decoded["test"][1],
        "classes": list(decoded["classes"]), "source": decoded["source"],
    }
    # Named per host and process: nodes sharing a filesystem may write the same cache at once.
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    if not _writable_dir(path.parent):
        return
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache is an optimisation: failing to write one is fine


def prepare(data_dir: Path, download: bool = True, workers: int = 2) -> tuple[Path | None, dict | None]:
    """Make sure a decoded cache exists (decode, or download then decode, if needed).

    Returns ``(cache file, decoded data or None)``: the data is returned too when it was decoded
    here, or when no writable cache location exists. Raises UserError on missing/bad data.
    """
    data_dir = Path(data_dir)
    source = find_source(data_dir)
    if source is None:
        if not download:
            raise UserError(f"--data-dir {data_dir}: no CIFAR-10 found; expected {EXPECTED_LAYOUT}"
                            " (or drop --no-download to fetch it)")
        source = Source("archive", download_archive(data_dir))
    path = cache_path(data_dir, source)
    if path is not None and path.is_file() and _read_cache(path) is not None:
        return path, None
    decoded = decode_source(source, workers)
    if path is not None:
        _write_cache(path, decoded)
    return path, decoded


def to_dataset(decoded: dict) -> CifarData:
    return CifarData(decoded["train"][0], decoded["train"][1], decoded["test"][0],
                     decoded["test"][1], tuple(decoded["classes"]), decoded["source"])


def load_cache(path: Path) -> CifarData:
    cached = _read_cache(path)
    if cached is None:
        raise UserError(f"{path}: the decoded CIFAR-10 cache is missing or unreadable; "
                        "delete it and run again")
    return CifarData(cached["train_images"], cached["train_labels"], cached["test_images"],
                     cached["test_labels"], tuple(cached["classes"]), cached["source"])


def _balanced(labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """Indices of the first ``per_class`` samples of each class, in dataset order."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class]
                      for c in range(num_classes)]).sort().values


def subset(data: CifarData, train_per_class: int | None, test_limit: int | None) -> CifarData:
    """A class-balanced part of the training set and ``test_limit`` test images drawn evenly
    from every class (the files are sorted by class, so the first N would be one class)."""
    train_images, train_labels = data.train_images, data.train_labels
    if train_per_class is not None:
        keep = _balanced(train_labels, train_per_class, data.num_classes)
        train_images, train_labels = train_images[keep], train_labels[keep]
    test_images, test_labels = data.test_images, data.test_labels
    if test_limit is not None and test_limit < len(test_labels):
        per_class = -(-test_limit // data.num_classes)
        keep = _balanced(test_labels, per_class, data.num_classes)[:test_limit]
        test_images, test_labels = test_images[keep], test_labels[keep]
    return CifarData(train_images, train_labels, test_images, test_labels, data.classes, data.source)


# ---------------------------------------------------------------------------------------------
# On-device batch transforms
# ---------------------------------------------------------------------------------------------

def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> ``dtype`` normalised with the CIFAR-10 mean and std."""
    mean = torch.tensor(MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (images.to(dtype) - mean) / std


@dataclass(frozen=True)
class Augment:
    """Which batch augmentations to apply (all on the device, per sample)."""

    translate: int = 2  # pixels of random shift (reflect padding), 0 = off
    flip: bool = True  # random horizontal flip
    cutout: int = 0  # side of a zeroed square in pixels, 0 = off

    @property
    def draws_random(self) -> bool:
        """True when ``augment`` needs a generator (any augmentation is on)."""
        return self.translate > 0 or self.flip or self.cutout > 0


def augment(images: torch.Tensor, aug: Augment, generator: torch.Generator | None) -> torch.Tensor:
    """Randomly translate, flip and cut out a float batch [B, C, H, W] (same device)."""
    b, _, h, w = images.shape
    dev = images.device
    if aug.translate > 0:
        r = aug.translate
        padded = torch.nn.functional.pad(images, (r, r, r, r), mode="reflect")
        dy = torch.randint(0, 2 * r + 1, (b,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * r + 1, (b,), generator=generator, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
        images = padded.gather(2, rows.expand(b, padded.shape[1], h, padded.shape[3]))
        images = images.gather(3, cols.expand(b, images.shape[1], h, w))
    if aug.flip:
        flip = torch.rand(b, generator=generator, device=dev) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if aug.cutout > 0:
        size = aug.cutout
        cy = torch.randint(0, h, (b,), generator=generator, device=dev)
        cx = torch.randint(0, w, (b,), generator=generator, device=dev)
        ys = torch.arange(h, device=dev)[None, :]
        xs = torch.arange(w, device=dev)[None, :]
        in_y = ((ys - cy[:, None]).abs() <= size // 2)[:, None, :, None]
        in_x = ((xs - cx[:, None]).abs() <= size // 2)[:, None, None, :]
        images = images.masked_fill(in_y & in_x, 0.0)
    return images
