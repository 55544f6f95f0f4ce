"""Finding CIFAR-10 in ``--data-dir`` and decoding it to uint8 tensors, in one of three layouts.

Looked for in this order:
1. torchvision's ``cifar-10-batches-py/`` folder (``data_batch_1..5``, ``test_batch``);
2. images in class folders, ``{train,test}/<class>/*.png|jpg``, in the data dir itself or in one
   sub-folder of it (e.g. an extracted ``cifar10-jpg/``);
3. a ``.tar.gz`` / ``.tgz`` in the data dir holding either of the above (read as a stream, never
   extracted), e.g. ``cifar10-jpg.tar.gz`` or torchvision's ``cifar-10-python.tar.gz``.

Every problem with the files is one UserError naming the file and what was expected. The pickled
batches are read by ``BatchUnpickler``, which runs no code from the file.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.errors import UserError

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SIZE = 32  # pixels, height = width

EXPECTED_LAYOUT = (
    f"{BATCHES_DIR}/ (data_batch_1..5, test_batch), or class folders train/<class>/*.png|jpg and "
    "test/<class>/*.png|jpg (directly or in one sub-folder), or a .tar.gz holding either"
)


@dataclass(frozen=True)
class Source:
    """Where the data is: ``kind`` is "batches", "folders" or "archive"."""

    kind: str
    path: Path


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
    archives = sorted(p for p in data_dir.iterdir() if p.is_file() and p.name.endswith((".tar.gz", ".tgz")))
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
        raise UserError(
            f"{archive}: not a readable .tar.gz ({err}); expected an archive holding {EXPECTED_LAYOUT}"
        ) from None
    return None


def _decode_image(data: bytes | Path, name: str) -> np.ndarray:
    """One image -> uint8 [3, 32, 32]; a UserError naming the file if it is not a 32x32 image."""
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:
            img.load()  # raises on truncated or corrupt data
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise UserError(
                    f"{name}: image is {img.size[0]}x{img.size[1]} pixels; "
                    f"expected {IMAGE_SIZE}x{IMAGE_SIZE} (CIFAR-10)"
                )
            array = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise UserError(f"{name}: corrupt or truncated image ({err}); expected a readable 32x32 PNG or JPEG") from None
    return array.transpose(2, 0, 1)


def _decode_all(items: list[tuple[bytes | Path, str]], workers: int) -> torch.Tensor:
    """Decode many images with a few threads (Pillow releases the GIL while decoding)."""
    if not items:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    chunk = max(1, len(items) // (4 * workers) + 1)
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]

    def decode_chunk(part: list[tuple[bytes | Path, str]]) -> np.ndarray:
        return np.stack([_decode_image(data, name) for data, name in part])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(decode_chunk, chunks))
    return torch.from_numpy(np.concatenate(arrays))


def _split_classes(where: str, split_classes: dict[str, dict[str, list]]) -> tuple[str, ...]:
    """Check the train/test class folders agree and are not empty; return the class names."""
    for split in ("train", "test"):
        if split not in split_classes:
            raise UserError(
                f"{where}: no {split}/ folder with class sub-folders; expected "
                f"{split}/<class>/*.png|jpg (layout: {EXPECTED_LAYOUT})"
            )
        classes = split_classes[split]
        if len(classes) < 2:
            raise UserError(
                f"{where}/{split}: found {len(classes)} class folder(s) with images; "
                f"expected one folder per class, {split}/<class>/*.png|jpg"
            )
        for name, files in classes.items():
            if not files:
                raise UserError(f"{where}/{split}/{name}: no .png/.jpg images; expected {split}/<class>/*.png|jpg")
    train, test = sorted(split_classes["train"]), sorted(split_classes["test"])
    if train != test:
        raise UserError(
            f"{where}: train/ has classes {train} but test/ has {test}; expected the same class folders in both"
        )
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
            raise UserError(
                f"{where}: image {p} is not inside a class folder; expected "
                "{train,test}/<class>/<image> (wrong folder layout)"
            )


def _load_folders(root: Path, workers: int) -> tuple[dict, tuple[str, ...]]:
    split_classes: dict[str, dict[str, list]] = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        _stray_images(str(split_dir), (p.name for p in split_dir.iterdir() if p.is_file()))
        split_classes[split] = {
            d.name: [(p, str(p)) for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            for d in sorted(split_dir.iterdir())
            if d.is_dir()
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
                        (data, f"{archive}:{member.name}")
                    )
                else:
                    stray.append(member.name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise UserError(
            f"{archive}: truncated or corrupt archive ({err}); expected a complete .tar.gz holding {EXPECTED_LAYOUT}"
        ) from None
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
            raise UserError(
                f"{where}/{name}: refused to load: it names {err}, which a CIFAR-10 "
                "batch never holds, and unpickling it could run code; expected "
                f"torchvision's {BATCHES_DIR} files"
            ) from None
        except Exception as err:  # noqa: BLE001 - any other failure means the file is damaged
            raise UserError(
                f"{where}/{name}: unreadable CIFAR-10 batch ({type(err).__name__}: "
                f"{err}); expected torchvision's pickled batch format"
            ) from None

    def load(name: str) -> dict:
        raw = read(name)
        if raw is None:
            raise UserError(
                f"{where}: {name} is missing; expected {', '.join(TRAIN_BATCHES)}, "
                f"{TEST_BATCH} and batches.meta (torchvision's {BATCHES_DIR})"
            )
        batch = unpickle(name, raw)
        try:
            if not isinstance(batch["data"], np.ndarray) or batch["data"].dtype != np.uint8:
                raise TypeError("'data' is not a uint8 array")
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
            labels = np.asarray(batch["labels"], dtype=np.int64)
        except Exception as err:  # noqa: BLE001 - any failure means the file is damaged
            raise UserError(
                f"{where}/{name}: unreadable CIFAR-10 batch ({type(err).__name__}: "
                f"{err}); expected torchvision's pickled batch format"
            ) from None
        if len(labels) != len(data):
            raise UserError(f"{where}/{name}: {len(data)} images but {len(labels)} labels")
        return {"data": data, "labels": labels}

    meta_raw = read("batches.meta")
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    if meta_raw:
        meta = unpickle("batches.meta", meta_raw)
        if not isinstance(meta, dict) or not all(isinstance(c, str) for c in meta.get("label_names", [0])):
            raise UserError(
                f"{where}/batches.meta: no 'label_names' list of strings; expected torchvision's {BATCHES_DIR} files"
            )
        classes = tuple(meta["label_names"])
    train = [load(name) for name in TRAIN_BATCHES]
    test = load(TEST_BATCH)
    out = {
        "train": (
            torch.from_numpy(np.concatenate([b["data"] for b in train])),
            torch.from_numpy(np.concatenate([b["labels"] for b in train])),
        ),
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
        raise UserError(
            f"{archive}: truncated or corrupt archive ({err}); expected torchvision's {ARCHIVE_NAME}"
        ) from None
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
    return {"train": splits["train"], "test": splits["test"], "classes": classes, "source": str(source.path)}
