"""Small convolutional models: the offline default's CNN, a small ResNet for 28x28 images and a
log-mel keyword-spotting CNN."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


def _conv_bn_relu(in_channels: int, out_channels: int, batch_norm: bool = True) -> list[nn.Module]:
    if not batch_norm:  # a bias takes BatchNorm's place
        return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


def small_cnn(num_classes: int, in_channels: int = 1, width: int = 32, batch_norm: bool = True) -> nn.Module:
    """Three conv-BN-ReLU blocks, one max-pool, global average pool and a linear classifier.

    Sized for 8x8 digits (about 56k weights at width 32) but works for any input of at least 2x2.
    BatchNorm is there on purpose: it exercises the aggregation of BN buffers like ResNet-18 does;
    `batch_norm=False` gives biased convolutions instead (a model whose steps do not depend on how a
    batch is split, e.g. to compare DDP with one device).
    """
    return nn.Sequential(
        *_conv_bn_relu(in_channels, width, batch_norm),
        *_conv_bn_relu(width, 2 * width, batch_norm),
        nn.MaxPool2d(2),
        *_conv_bn_relu(2 * width, 2 * width, batch_norm),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


class SmallResNet(nn.Module):
    """ResNet-18's design scaled to 28x28 images; see `small_resnet`."""

    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _downsampling_block(width, 2 * width)
        self.layer2 = _downsampling_block(2 * width, 4 * width)
        self.layer3 = _downsampling_block(4 * width, 8 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _downsampling_block(in_channels: int, out_channels: int) -> BasicBlock:
    """torchvision's ResNet block at stride 2 with ResNet-18's 1x1 convolution + BatchNorm shortcut."""
    shortcut = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(out_channels)
    )
    return BasicBlock(in_channels, out_channels, stride=2, downsample=shortcut)


def small_resnet(num_classes: int, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A ResNet for 28x28 images (Fashion-MNIST, MNIST) with ResNet-18's parts: a 3x3 stride-2 stem
    (28 -> 14), three residual blocks that halve the resolution and double the width (14 -> 7 -> 4 ->
    2; widths 2, 4 and 8 times `width`) with 1x1 downsample shortcuts, global average pooling and a
    linear classifier.

    At width 16: 302,480 conv/linear weights (ResNet-18: 11.2M) and 82 MFLOP per forward pass of a
    batch of 16 grey 28x28 images. The weights sit where ResNet-18's do, in the widest block at the
    lowest resolution, which global magnitude pruning at 99% empties first (in ResNet-18 too); the
    1x1 shortcuts then still connect input and classifier, so 1% of the weights (3k) remains a
    network that learns. The shortcut convs are ordinary layers here: methods wrap them like every
    other (the authors' layer walk is reproduced for their ResNet-18s only). Every layer stacks
    (`models.stacked`).
    """
    return SmallResNet(num_classes, in_channels, width)


def logmel_cnn(num_classes: int = 35, in_channels: int = 1, width: int = 64) -> nn.Module:
    """A keyword-spotting CNN over log-mel features (B, 1, n_mels, frames).

    Four conv-BN-ReLU blocks with max-pooling between them, then global average pooling.
    """
    return nn.Sequential(
        *_conv_bn_relu(in_channels, width),
        nn.MaxPool2d(2),
        *_conv_bn_relu(width, width),
        nn.MaxPool2d(2),
        *_conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2),
        *_conv_bn_relu(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
