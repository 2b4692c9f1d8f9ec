"""BiGAN's generator and joint discriminator (DCGAN-style, 32 or 64 px), with the DCGAN init.

  * Generator: z (latent_dim) -> Linear -> 4x4 -> transposed 4x4/2 convs with BatchNorm + ReLU
    -> tanh image in [-1, 1], 32 px (64 px: one more block).
  * Discriminator D(x, z): x-branch of 4x4/2 convs with LeakyReLU(0.2) down to 4x4; z-branch of
    two 512-unit layers; concatenated -> dropout -> 1024 -> dropout -> one logit. No BatchNorm
    in D (real and generated pairs go through it in one batch; batch statistics would leak the label).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from monossl.errors import UserError


def _dcgan_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _blocks(size: int) -> int:
    """Number of x2 resolution steps between 4x4 and `size` (32 -> 3, 64 -> 4)."""
    n = int(round(math.log2(size / 4)))
    if size < 8 or 4 * 2**n != size:
        raise UserError(f"BiGAN image_size must be 4 x a power of two (32, 64, ...), got {size}")
    return n


class Generator(nn.Module):
    """DCGAN generator: z -> (B, 3, size, size) in [-1, 1]."""

    def __init__(self, latent_dim: int = 200, size: int = 32, width: int = 64):
        super().__init__()
        n = _blocks(size)
        ch = width * 2 ** (n - 1)
        self.size, self.latent_dim, self.top = size, latent_dim, ch
        self.fc = nn.Sequential(nn.Linear(latent_dim, ch * 16, bias=False), nn.BatchNorm1d(ch * 16), nn.ReLU(True))
        layers = []
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor):
        return self.net(self.fc(z).view(-1, self.top, 4, 4))


class Discriminator(nn.Module):
    """Joint D(x, z) -> one logit per pair; x in [-1, 1] at `size` px, z latent_dim-d."""

    def __init__(self, latent_dim: int = 200, size: int = 32, width: int = 64, dropout: float = 0.2):
        super().__init__()
        n = _blocks(size)
        layers, ch, cin = [], width, 3
        for _ in range(n):
            layers += [nn.Conv2d(cin, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            cin, ch = ch, ch * 2
        self.x_net = nn.Sequential(*layers, nn.Flatten())
        self.z_net = nn.Sequential(nn.Linear(latent_dim, 512), nn.LeakyReLU(0.2, True),
                                   nn.Linear(512, 512), nn.LeakyReLU(0.2, True))
        self.joint = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin * 16 + 512, 1024), nn.LeakyReLU(0.2, True),
                                   nn.Dropout(dropout), nn.Linear(1024, 1))
        self.size = size
        _dcgan_init(self)

    def forward(self, x: torch.Tensor, z: torch.Tensor):
        return self.joint(torch.cat([self.x_net(x), self.z_net(z)], 1)).squeeze(1)
