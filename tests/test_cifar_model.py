"""cifar/: GPU-style augmentation and the models, in-process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cifar import data as cdata
from cifar import optim as cifar_optim
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


def _muon_model() -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    conv, head = model[0].weight, [model[2].weight, model[2].bias]
    return model, [dict(params=head), dict(params=[conv], lr=0.1, momentum=0.6, muon=True)]


def _steps(model, optimizer, grad_scale: float = 1.0, steps: int = 3) -> None:
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        (model(x).square().mean() * grad_scale).backward()
        optimizer.step()


def test_orthogonalize_pushes_singular_values_toward_one():
    for shape in ((8, 27), (27, 8)):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 5
        s = torch.linalg.svdvals(cifar_optim.orthogonalize(g))
        assert s.shape == (8,) and 0.3 < s.min() and s.max() < 1.6, s
        assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 2  # the input's are not


def test_muon_steps_sgd_groups_like_sgd_and_filters_by_direction_only():
    """The head's group steps exactly as torch's Nesterov SGD (weight decay included); the conv
    group normalises its weight, ignores the gradient's scale and takes no weight decay."""
    model, groups = _muon_model()
    reference = copy.deepcopy(model)
    for net in (model, reference):
        net[0].weight.requires_grad_(False)  # the head alone: its gradients are then the same
    muon = cifar_optim.Muon(groups, lr=0.05, momentum=0.85, weight_decay=0.01)
    sgd = torch.optim.SGD(reference[2].parameters(), lr=0.05, momentum=0.85, nesterov=True, weight_decay=0.01)
    _steps(model, muon)
    _steps(reference, sgd)
    torch.testing.assert_close(model[2].weight, reference[2].weight, rtol=0, atol=0)
    torch.testing.assert_close(model[2].bias, reference[2].bias, rtol=0, atol=0)

    # The filters alone (the head frozen): a 1024x larger gradient (exact in floats) takes the
    # same steps.
    runs = []
    for scale in (1.0, 1024.0):
        model, groups = _muon_model()
        model[2].requires_grad_(False)
        _steps(model, cifar_optim.Muon(groups, lr=0.05, momentum=0.85, weight_decay=0.01), grad_scale=scale)
        runs.append(model[0].weight)
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-3, atol=1e-4)
    assert not torch.equal(runs[0], _muon_model()[0][0].weight)  # it moved
    # One step from norm sqrt(8): the rescaled weight plus 0.1 x an update of singular values ~1.
    one, one_groups = _muon_model()
    _steps(one, cifar_optim.Muon(one_groups, lr=0.05, momentum=0.85), steps=1)
    assert abs(float(one[0].weight.detach().norm()) - 8**0.5) < 0.1 * 8**0.5


def test_muon_refuses_resnet():
    from cifar.train import parse_args

    with pytest.raises(UserError, match="airnet only"):
        parse_args(["--optimizer", "muon", "--arch", "resnet18", "--device", "cpu", "--out-dir", "/tmp/x"])


def test_muon_step_at_lr_zero_leaves_the_weights_unscaled():
    """torch's checkpoint loader creates optimizer state by a step at lr 0: Muon's weight
    rescaling must not run then, or a resumed run starts from other weights."""
    model, groups = _muon_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = cifar_optim.Muon(groups, lr=0.0, momentum=0.85)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    _steps(model, optimizer, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(optimizer.state) == 3  # the state exists for the loader to fill
