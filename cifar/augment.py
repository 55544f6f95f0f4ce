"""Augmentation on a whole batch already on the device, and input normalisation.

Random translate with reflect padding, horizontal flip and cutout, per sample, drawn from an
explicit generator: the GPU never waits for a CPU loader, and a resumed run draws the same numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Per-channel statistics of the CIFAR-10 training set (on 0..1 pixels), for input normalisation.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> ``dtype`` normalised with the CIFAR-10 mean and std."""
    mean, std = _pixel_stats(images.device, dtype)
    return (images.to(dtype) - mean) / std


@functools.cache
def _pixel_stats(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD on 0..255 pixels, shaped [1, 3, 1, 1]: copied to ``device`` once, not per
    batch (a copy from the host makes a GPU step wait for the CPU)."""
    mean = torch.tensor(MEAN, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, dtype=dtype).view(1, 3, 1, 1) * 255
    return mean.to(device), std.to(device)


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


def alternating_flips(n: int, seed: int) -> torch.Tensor:
    """airbench's alternating flip: which of ``n`` training images are flipped in even epochs (a
    random half, fixed by ``seed``); odd epochs flip the others. Over any two epochs each image
    is seen both ways, where independent coin flips show a quarter of them one way only."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5


def augment(
    images: torch.Tensor,
    aug: Augment,
    generator: torch.Generator | None,
    share: tuple[int, int, int] | None = None,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Randomly translate, flip and cut out a float batch [B, C, H, W] (same device).

    ``flips`` (bool per image): which images to flip, instead of a coin flip each (the
    alternating scheme, ``alternating_flips``).

    With ``share = (rank, world_size, global_n)`` the batch is this rank's share of a global
    batch of ``global_n`` images (its positions ``rank, rank + world_size, ...``): every draw is
    made for the whole global batch, from a generator seeded alike on every rank, and this rank
    keeps its positions, so each image is augmented the same way at any world size.
    """
    b, _, h, w = images.shape
    dev = images.device

    def draw(sample: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """``sample(k)`` draws k values: one per image of this batch, or of the global one."""
        if share is None:
            return sample(b)
        rank, world_size, global_n = share
        return sample(global_n)[rank::world_size]

    def randint(high: int) -> torch.Tensor:
        return draw(lambda k: torch.randint(0, high, (k,), generator=generator, device=dev))

    if aug.translate > 0:
        r = aug.translate
        padded = torch.nn.functional.pad(images, (r, r, r, r), mode="reflect")
        dy = randint(2 * r + 1)
        dx = randint(2 * r + 1)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
        images = padded.gather(2, rows.expand(b, padded.shape[1], h, padded.shape[3]))
        images = images.gather(3, cols.expand(b, images.shape[1], h, w))
    if aug.flip:
        flip = flips if flips is not None else draw(lambda k: torch.rand(k, generator=generator, device=dev)) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if aug.cutout > 0:
        size = aug.cutout
        cy = randint(h)
        cx = randint(w)
        ys = torch.arange(h, device=dev)[None, :]
        xs = torch.arange(w, device=dev)[None, :]
        in_y = ((ys - cy[:, None]).abs() <= size // 2)[:, None, :, None]
        in_x = ((xs - cx[:, None]).abs() <= size // 2)[:, None, None, :]
        images = images.masked_fill(in_y & in_x, 0.0)
    return images
