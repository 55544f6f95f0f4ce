"""Models: a fast residual CNN in the style of the CIFAR-10 speed records, and ResNet-18 fine-tuning.

``AirNet`` follows KellerJordan/airbench's ``airbench94`` (itself from hlb-CIFAR10): a frozen
2x2 "whitening" convolution computed from the training images' patch covariance, then three
groups of conv -> max-pool -> BatchNorm -> GELU, each followed by ``depth - 1`` more 3x3 convs
(here with a residual connection), a global max-pool and a linear layer scaled by 1/9. BatchNorm
scales stay fixed at 1 (only shifts are learned) and the input-side filters of each conv start as
the identity, which lets very high learning rates work from the first step.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.parallel import sum_over_ranks

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


class Conv(nn.Conv2d):
    """3x3 'same' conv without bias whose first ``in_channels`` filters start as the identity."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        weight = self.weight.data
        torch.nn.init.dirac_(weight[: weight.size(1)])


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with the scale frozen at 1: only the shift (bias) is trained.

    ``across_ranks`` (``--world-size-invariant``): in training, the statistics are those of
    the whole global batch, not of this rank's share of it: each rank's per-channel sums are
    summed over the ranks (``common.parallel.sum_over_ranks``, whose backward sums the gradients
    too), so 1 process with 1024 images and 8 with 128 each normalise alike. It costs one small
    all-reduce per layer and step each way.
    """

    across_ranks = False

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(channels, momentum=momentum, eps=eps)
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.across_ranks):
            return super().forward(x)
        # Summed in float64: the variance as E[x^2] - E[x]^2 would lose its digits in float32.
        x = x.float()
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)
        sums = torch.cat(
            [x.sum(dim=(0, 2, 3), dtype=torch.float64), (x * x).sum(dim=(0, 2, 3), dtype=torch.float64), count]
        )
        sums = sum_over_ranks(sums)
        c, n = x.shape[1], sums[-1]
        mean = sums[:c] / n
        var = (sums[c : 2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():  # running statistics, as nn.BatchNorm2d keeps them (unbiased var)
            self.running_mean.lerp_(mean.float(), self.momentum)
            self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).float(), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight / torch.sqrt(var + self.eps).float()
        shift = self.bias - mean.float() * scale
        return x * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU, then ``depth - 1`` x (conv -> BN -> GELU)."""

    def __init__(self, cin: int, cout: int, depth: int, residual: bool) -> None:
        super().__init__()
        self.entry = nn.Sequential(Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout), nn.GELU())
        self.blocks = nn.ModuleList(
            nn.Sequential(Conv(cout, cout), BatchNorm(cout), nn.GELU()) for _ in range(depth - 1)
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        for block in self.blocks:
            x = x + block(x) if self.residual else block(x)
        return x


class AirNet(nn.Module):
    """Whitening conv + three ConvGroups + max-pool + scaled linear head. 32x32 inputs."""

    def __init__(
        self,
        widths: tuple[int, int, int] = (64, 256, 256),
        depth: int = 2,
        num_classes: int = 10,
        residual: bool = True,
        whiten_width: int = 2,
        head_scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        whiten_channels = 2 * 3 * whiten_width**2  # each eigen-patch and its negative
        self.whiten = nn.Conv2d(3, whiten_channels, kernel_size=whiten_width, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        groups, cin = [], whiten_channels
        for width in widths:
            groups.append(ConvGroup(cin, width, depth, residual))
            cin = width
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.head_scale = head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.groups(x)
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.head_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the frozen first conv to whiten ``images``' patches (normalised float [N,3,H,W])."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.transpose(1, 3).reshape(-1, 3 * k * k)
        # One thread: a CPU's matrix product sums in an order that depends on the thread count,
        # and eigenvectors of nearly equal eigenvalues turn with the last bits, so a process of
        # a 2-process run (1 thread each) would fit other filters than a 1-process run.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            patches = patches - patches.mean(0)
            covariance = patches.T @ patches / len(patches)
        finally:
            torch.set_num_threads(threads)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors.T / torch.sqrt(eigenvalues[:, None] + eps)).float()
        filters = filters.reshape(-1, 3, k, k)  # rows are (channel, dy, dx), like conv weights
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def norm_biases(self) -> list[nn.Parameter]:
        """The BatchNorm shifts, trained with a larger learning rate (as in airbench)."""
        return [m.bias for m in self.modules() if isinstance(m, nn.BatchNorm2d)]


def resnet18(num_classes: int, weights: str | None) -> nn.Module:
    """torchvision's ResNet-18 with ImageNet weights and a new ``num_classes`` output layer.

    ``weights``: a path to a state_dict (e.g. ``resnet18-f37072fd.pth``), ``"none"`` for random
    initialisation, or None to use torchvision's download cache / download (needs internet).
    """
    from torchvision.models import ResNet18_Weights
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None)
    if weights == "none":
        pass
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UserError(
                f"--weights {path}: no such file; expected a ResNet-18 state_dict "
                f"(e.g. {RESNET18_URL}) or --weights none"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means an unusable file
            raise UserError(f"--weights {path}: not a readable PyTorch state_dict ({err})") from None
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(f"--weights {path}: not a torchvision ResNet-18 state_dict ({first})") from None
    else:
        try:
            model.load_state_dict(ResNet18_Weights.DEFAULT.get_state_dict(progress=False))
        except Exception as err:  # noqa: BLE001 - no cache and no network
            raise UserError(
                f"--arch resnet18: no pretrained weights available (not in the torch hub cache, "
                f"and the download failed: {type(err).__name__}); download {RESNET18_URL} "
                "elsewhere and pass --weights PATH, or --weights none to train from scratch"
            ) from None
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def use_bf16(cfg, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast: ``cfg.amp``, the device, and ``cfg.compile``."""
    if cfg.compile and device.type == "cpu":
        # torch 2.14's inductor on CPU gives non-finite AirNet gradients under bf16 autocast
        # (found on this project's machine; eager bf16 and compiled fp32 are fine).
        return False
    if not torch.amp.is_autocast_available(device.type):
        return False
    if cfg.amp != "auto":
        return cfg.amp == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_autocast(device: torch.device, enabled: bool):
    """The forward's precision, chosen here under DDP and FSDP alike: bf16 matmuls and convs
    with fp32 weights, BatchNorm statistics and loss (``torch.autocast``), or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
