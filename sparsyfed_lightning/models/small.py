"""Small convolutional models: the offline default's CNN and a log-mel keyword-spotting CNN."""

from __future__ import annotations

from torch import nn


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
