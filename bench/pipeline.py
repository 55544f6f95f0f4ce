"""The CIFAR data-path study: the project's uint8 tensor cache + on-device augmentation versus
torchvision's ImageFolder + DataLoader + PIL transforms, on the same JPEG files, in one process."""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from bench.timing import _clock, _device_name
from common.data import TrainBatches
from common.dist import distributed
from common.errors import UserError
from common.records import write_json_atomic

PIPELINE_PER_CLASS = 512  # CIFAR training images per class in the data-path comparison


def extract_jpeg_subset(archive: Path, target: Path, per_class: int) -> int:
    """Write the first ``per_class`` training JPEGs of each class (by file name) to ``target``.

    The project's cache orders each class by file name too, so ``cifar.data.subset`` picks the
    very same images. Returns the number of files written.
    """
    members: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(archive, "r|*") as tf:
        for member in tf:
            parts = member.name.split("/")
            if (
                member.isfile()
                and len(parts) >= 3
                and parts[-3] == "train"
                and parts[-1].lower().endswith((".jpg", ".jpeg", ".png"))
            ):
                members.setdefault(parts[-2], []).append((member.name, tf.extractfile(member).read()))
    if not members:
        raise UserError(
            f"{archive}: no train/<class>/*.jpg images; expected CIFAR-10 as JPEG "
            "files in class folders (e.g. cifar10-jpg.tar.gz)"
        )
    written = 0
    for cls, files in members.items():
        (target / cls).mkdir(parents=True)
        for name, raw in sorted(files)[:per_class]:
            (target / cls / Path(name).name).write_bytes(raw)
            written += 1
    return written


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def worker_pipeline(args: argparse.Namespace) -> None:
    """Images/s delivered to the model by both data paths, on the same images, one process."""
    from torchvision import datasets, transforms

    from cifar import train as c
    from cifar.data import MEAN, STD, Augment, augment, normalize, subset

    archive = Path(args.data_dir) / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        raise UserError(
            f"{archive}: missing; the data-path comparison needs the CIFAR-10 JPEG "
            "archive (cifar10-jpg/{train,test}/<class>/NNNN.jpg)"
        )
    epochs = args.pipeline_epochs
    with distributed(args.device) as dist, tempfile.TemporaryDirectory() as scratch:
        batch = 512
        # Same augmentation strength on both paths: shift by up to 4 pixels and flip.
        aug = Augment(translate=4, flip=True, cutout=0)
        # The project's path: the decoded uint8 cache (built once per dataset, then loaded).
        cfg = c.parse_args(
            [
                "--data-dir",
                str(args.data_dir),
                "--device",
                args.device,
                "--out-dir",
                str(Path(scratch) / "run"),
                "--no-download",
            ]
        )
        t0 = time.perf_counter()
        data = subset(c.build_data(cfg, dist), PIPELINE_PER_CLASS, 1)
        images, labels = data.train_images.to(dist.device), data.train_labels.to(dist.device)
        load_s = time.perf_counter() - t0
        n = len(labels)
        batches = TrainBatches([images, labels], batch, dist, seed=0)
        generator = torch.Generator(dist.device).manual_seed(0)

        def project_epoch(epoch: int) -> int:
            delivered = 0
            for xb, _ in batches.epoch(epoch):
                x = augment(normalize(xb), aug, generator).contiguous(memory_format=torch.channels_last)
                delivered += len(x)
            _clock(dist.device)
            return delivered

        project_epoch(0)  # warm-up
        t0 = _clock(dist.device)
        delivered = sum(project_epoch(e) for e in range(1, epochs + 1))
        project = {
            "pipeline": "project: uint8 tensor cache + on-device batch augmentation",
            "workers": 0,
            "images": delivered,
            "seconds": time.perf_counter() - t0,
        }
        project["images_per_s"] = _rate(delivered, project["seconds"])

        # torchvision's usual path on the same JPEG files.
        folder = Path(scratch) / "train"
        t0 = time.perf_counter()
        written = extract_jpeg_subset(archive, folder, PIPELINE_PER_CLASS)
        extract_s = time.perf_counter() - t0
        if written != n:
            raise UserError(f"{archive}: extracted {written} images but the cache subset has {n}")
        transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )
        dataset = datasets.ImageFolder(str(folder), transform=transform)
        baselines = []
        for workers in args.loader_workers:
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=batch,
                shuffle=True,
                drop_last=False,
                num_workers=workers,
                persistent_workers=workers > 0,
                pin_memory=dist.device.type == "cuda",
            )

            def loader_epoch(loader: torch.utils.data.DataLoader) -> int:
                delivered = 0
                for xb, _ in loader:
                    x = xb.to(dist.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    delivered += len(x)
                _clock(dist.device)
                return delivered

            loader_epoch(loader)  # warm-up: starts the workers, fills the page cache
            t0 = _clock(dist.device)
            delivered = sum(loader_epoch(loader) for _ in range(epochs))
            seconds = time.perf_counter() - t0
            baselines.append(
                {
                    "pipeline": "torchvision: ImageFolder + DataLoader + PIL transforms",
                    "workers": workers,
                    "images": delivered,
                    "seconds": seconds,
                    "images_per_s": _rate(delivered, seconds),
                }
            )
            del loader
        best = max(baselines, key=lambda b: b["images_per_s"])
        write_json_atomic(
            args.result,
            {
                "device": dist.device.type,
                "device_name": _device_name(dist.device),
                "threads_per_process": torch.get_num_threads(),
                "images": n,
                "batch": batch,
                "timed_epochs": epochs,
                "cache_load_s": load_s,
                "jpeg_extract_s": extract_s,
                "project": project,
                "torchvision": baselines,
                "ratio_vs_best_torchvision": project["images_per_s"] / best["images_per_s"],
            },
        )
