"""CIFAR-10 for the training program: the entry ``cifar/train.py`` imports.

The jobs live in their own modules, re-exported here:
- ``cifar.sources``: find CIFAR-10 in ``--data-dir`` (torchvision's batches, class folders of
  PNG/JPEG, or a .tar.gz of either) and decode it to uint8 tensors;
- ``cifar.cache``: download it when absent (SHA-256 checked), decode once, keep a uint8 tensor
  cache, ``load`` -> ``CifarData``;
- ``cifar.augment``: normalisation and augmentation of a whole batch on the device;
- here: ``subset``, a class-balanced part of the data for quick runs, and ``prepare_batch``,
  what the model is fed.
"""

from __future__ import annotations

import torch

from cifar.augment import MEAN, STD, Augment, alternating_flips, augment, normalize
from cifar.cache import (
    CACHE_VERSION,
    DOWNLOAD_SHA256,
    DOWNLOAD_URL,
    CifarData,
    cache_dirs,
    cache_path,
    download_archive,
    load,
    load_cache,
    to_dataset,
)
from cifar.sources import (
    ARCHIVE_NAME,
    BATCHES_DIR,
    EXPECTED_LAYOUT,
    IMAGE_SIZE,
    IMAGE_SUFFIXES,
    TEST_BATCH,
    TRAIN_BATCHES,
    BatchUnpickler,
    Source,
    decode_source,
    find_source,
    unpickle_batch,
)

__all__ = [
    "MEAN",
    "STD",
    "Augment",
    "alternating_flips",
    "augment",
    "normalize",
    "CACHE_VERSION",
    "DOWNLOAD_SHA256",
    "DOWNLOAD_URL",
    "CifarData",
    "cache_dirs",
    "cache_path",
    "download_archive",
    "load",
    "load_cache",
    "to_dataset",
    "ARCHIVE_NAME",
    "BATCHES_DIR",
    "EXPECTED_LAYOUT",
    "IMAGE_SIZE",
    "IMAGE_SUFFIXES",
    "TEST_BATCH",
    "TRAIN_BATCHES",
    "BatchUnpickler",
    "Source",
    "decode_source",
    "find_source",
    "unpickle_batch",
    "subset",
    "prepare_batch",
]


def _balanced(labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """Indices of the first ``per_class`` samples of each class, in dataset order."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)]).sort().values


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


def prepare_batch(
    images: torch.Tensor,
    channels_last: bool,
    aug: Augment | None = None,
    generator: torch.Generator | None = None,
    share: tuple[int, int, int] | None = None,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised (and augmented, with ``aug``; ``share`` and ``flips``: see ``augment``)
    images, in channels-last memory format when the model is."""
    x = normalize(images) if aug is None else augment(normalize(images), aug, generator, share, flips)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
