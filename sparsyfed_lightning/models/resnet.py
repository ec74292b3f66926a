"""ResNet-18 variants of the paper (SPEC 13.2), built on torchvision's resnet18.

Both are marked with `AUTHORS_LAYER_WALK`: the authors ran their layer-replacement walk on these
networks, which leaves the three 1x1 downsample convs plain (SPEC 3.2); methods reproduce that
unless told to wrap every layer (`sparse.layers.layers_outside_authors_walk`).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from sparsyfed_lightning.sparse.layers import AUTHORS_LAYER_WALK


def resnet18_cifar(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 bias-free stem and no max-pool (CIFAR inputs)."""
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    setattr(model, AUTHORS_LAYER_WALK, True)
    return model


class WaveformResNet18(nn.Module):
    """The paper's speech model: a 2-D ResNet-18 that reads a (B, 1, T) waveform as a 1xT image.

    Stem Conv2d(1, 64, 7x7, stride 2, pad 3, no bias); torchvision's max-pool is kept. The height
    stays 1 throughout the network.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = resnet18(num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() == 2:  # (B, T) -> (B, 1, T)
            waveform = waveform.unsqueeze(1)
        return self.net(waveform.unsqueeze(2))


def resnet18_speech(num_classes: int = 35) -> nn.Module:
    """The paper's Speech Commands ResNet-18 on 8 kHz waveforms (input (B, 1, 8000))."""
    model = WaveformResNet18(num_classes)
    setattr(model, AUTHORS_LAYER_WALK, True)
    return model
