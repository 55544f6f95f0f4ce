"""cifar/: GPU-style augmentation and the models, in-process."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar import data as cdata
from cifar.model import AirNet, resnet18
from common.errors import UserError


def test_augment_is_seeded_and_switchable() -> None:
    x = torch.randn(6, 3, 32, 32)
    def run(aug: cdata.Augment, seed: int = 0) -> torch.Tensor:
        return cdata.augment(x, aug, torch.Generator().manual_seed(seed))
    full = cdata.Augment(translate=2, flip=True, cutout=8)
    assert torch.equal(run(full), run(full)) and not torch.equal(run(full), run(full, 1))
    assert torch.equal(run(cdata.Augment(0, False, 0)), x)
    cut = run(cdata.Augment(0, False, 8))
    assert ((cut == 0).flatten(1).sum(1) > 0).all()
    shifted = run(cdata.Augment(2, False, 0))
    assert shifted.shape == x.shape


def test_airnet_shapes_and_whitening() -> None:
    model = AirNet((8, 16, 16), depth=3, num_classes=3)
    images = torch.randn(40, 3, 32, 32)
    model.init_whitening(images)
    assert model(images[:5]).shape == (5, 3)
    assert not model.whiten.weight.requires_grad


def test_resnet18_weights_from_file_and_clear_errors(tmp_path: Path) -> None:
    from torchvision.models import resnet18 as tv_resnet18

    path = tmp_path / "resnet18.pth"
    reference = tv_resnet18()
    torch.save(reference.state_dict(), path)
    model = resnet18(3, str(path))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 3
    with pytest.raises(UserError, match="no such file"):
        resnet18(10, str(tmp_path / "missing.pth"))
    torch.save({"nope": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not a torchvision ResNet-18"):
        resnet18(10, str(tmp_path / "wrong.pth"))
    assert resnet18(10, "none").fc.out_features == 10


def test_alternating_flips_show_every_image_both_ways_over_two_epochs():
    """--alternating-flip: a fixed random half flipped in even epochs, the other half in odd
    ones; augment flips exactly the images it is told to."""
    even = cdata.alternating_flips(1000, seed=3)
    assert torch.equal(even, cdata.alternating_flips(1000, seed=3))
    assert 0.4 < even.float().mean() < 0.6 and not torch.equal(even, cdata.alternating_flips(1000, seed=4))
    odd = even ^ True
    assert not (even & odd).any() and (even | odd).all()
    x = torch.randn(6, 3, 4, 4)
    flips = torch.tensor([True, False, True, False, False, True])
    out = cdata.augment(x, cdata.Augment(0, True, 0), torch.Generator().manual_seed(0), flips=flips)
    assert torch.equal(out[flips], x[flips].flip(3)) and torch.equal(out[~flips], x[~flips])
