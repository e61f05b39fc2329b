"""The VAE-flow's encoder: images to a diagonal Gaussian q(z | y) over the global latent.

The layout of the reference code's ``global_resnet_bn`` encoder and Gaussian
"discriminator" (XuezheMax/wolf): per level, a residual block at stride 1 and one at stride 2
(each conv3x3 -> norm -> ELU -> conv3x3 -> norm, plus a shortcut, then ELU), a 1x1
convolution to a few channels with ELU, flattened, and a linear layer to (mu, log sigma^2).
Written here for flowkit; not the reference's code.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

Norm = Literal["batch", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


class _ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: Norm) -> None:
        super().__init__()
        bias = norm == "none"  # a norm's shift stands in for the bias
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias), _norm(norm, out_channels),
            nn.ELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias), _norm(norm, out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                                          _norm(norm, out_channels))
        self.act = nn.ELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.main(x) + self.shortcut(x))


class GlobalEncoder(nn.Module):
    """``y - 1/2`` of shape ``(B, C, H, W)`` -> ``(mu, logvar)``, each ``(B, latent_dim)``.

    Each entry of ``hidden`` is one level that halves the height and width (rounding up). The
    linear layer starts at zero, so q(z | y) = N(0, I) for every image at initialisation: the
    KL to a standard normal prior starts at 0, and z carries no information until training
    finds a use for it. In training mode batch norm uses batch statistics (as the reference
    does), so rows of a training batch are not independent there; evaluation uses the running
    statistics.
    """

    def __init__(self, in_shape: tuple[int, int, int], *, hidden: tuple[int, ...], out_channels: int,
                 latent_dim: int, norm: Norm) -> None:
        super().__init__()
        channels, height, width = in_shape
        layers: list[nn.Module] = []
        for width_out in hidden:
            layers += [_ResidualBlock(channels, width_out, 1, norm), _ResidualBlock(width_out, width_out, 2, norm)]
            channels = width_out
            height, width = (height + 1) // 2, (width + 1) // 2
        layers += [nn.Conv2d(channels, out_channels, 1), nn.ELU(), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(out_channels * height * width, 2 * latent_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.features(x)).chunk(2, dim=1)
        return mu, logvar
