"""A small Vision Transformer built only from `nn.Linear`, `nn.LayerNorm` and explicit attention.

Every learned matrix is an `nn.Linear` called through its own forward (patch embedding, the fused
query/key/value projection, the attention output projection, the MLP and the classifier), so
Powerprop, activation pruning of the linear inputs (3-D `(batch, tokens, features)` tensors; the
Top-K runs over the whole tensor, as for any layer) and end-of-fit pruning reach all of them.
`nn.MultiheadAttention` would not allow that: it keeps its input projection as a raw parameter and
uses its output projection's weight without calling that layer.

Positions are a fixed 2-D sine-cosine code (no learned parameter), added to the patch embeddings;
the classifier reads the mean of the final tokens (no class token). Sized for 8x8 digits with the
defaults (16 tokens of 2x2 patches, about 67k weights); use `patch_size=4` for 28x28 or 32x32 images.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Multi-head self-attention with explicit `nn.Linear` projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        # reshape copies the transposed heads: the projection's input is contiguous, as the
        # activation pruning of its saved input expects.
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_positions(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position code `(rows * cols, dim)`: half the features per axis."""
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    y, x = torch.meshgrid(torch.arange(rows).float(), torch.arange(cols).float(), indexing="ij")
    angles_y = y.reshape(-1, 1) * frequencies
    angles_x = x.reshape(-1, 1) * frequencies
    code = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    return F.pad(code, (0, dim - code.shape[1]))  # dim not divisible by 4: zero the last features


class VisionTransformer(nn.Module):
    """Patches -> linear embedding + fixed positions -> `depth` blocks -> LayerNorm -> mean -> linear."""

    def __init__(
        self, num_classes: int, in_channels: int, patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        for name, value in (("patch_size", patch_size), ("dim", dim), ("depth", depth), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1")
        self.patch_size = patch_size
        self.embed = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._positions: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, C * p * p), contiguous."""
        batch, channels, height, width = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input of {height}x{width} pixels is not divisible into {p}x{p} patches (patch_size)")
        grid = images.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return grid.reshape(batch, (height // p) * (width // p), channels * p * p)

    def positions(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        key = (rows, cols, like.device, like.dtype)
        if key not in self._positions:
            self._positions[key] = sincos_positions(rows, cols, like.shape[-1]).to(like.device, like.dtype)
        return self._positions[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.patches(images))
        tokens = tokens + self.positions(images.shape[2] // self.patch_size, images.shape[3] // self.patch_size, tokens)
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def vit(
    num_classes: int,
    in_channels: int = 1,
    patch_size: int = 2,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: float = 2.0,
) -> nn.Module:
    """A small ViT (see the module doc); the defaults suit 8x8 digits, `patch_size=4` 28x28/32x32 images."""
    if not math.isfinite(mlp_ratio) or mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio={mlp_ratio!r} is invalid; it must be > 0")
    return VisionTransformer(num_classes, in_channels, patch_size, dim, depth, heads, mlp_ratio)
