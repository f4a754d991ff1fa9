"""Convolutional variational autoencoder with a diagonal Gaussian posterior.

The VAE (Kingma & Welling 2014, "Auto-Encoding Variational Bayes") maps an image
x ∈ [-1, 1]^{3×H×W} to a posterior q(z | x) = N(μ(x), diag σ²(x)) over a latent of
shape (latent_channels, H/f, W/f), and maps a latent back to an image. The latent
diffusion model (Rombach et al. 2022) trains its denoiser in that small latent space.

Layout (f = downsample_factor = 2**(levels-1), ch_i = base_channels·channel_mults[i]):

    Encoder  conv_in(3 → ch_0)
             level i: num_res_blocks × ResBlock(→ ch_i), then ConvDownsample (not at the last level)
             mid ResBlock → GroupNorm → SiLU → conv(→ 2·latent_channels) = (μ, log σ²)
    Decoder  conv_in(latent_channels → ch_last) → mid ResBlock
             level i, deepest first: num_res_blocks × ResBlock(→ ch_i), then ConvUpsample (not at level 0)
             GroupNorm → SiLU → conv_out(→ 3)

There is no attention (the model must stay quick on a CPU) and no tanh at the end:
the reconstruction is unbounded, so the loss sees the raw output and its gradient
never vanishes in a saturated tanh; callers clamp to [-1, 1] when they save images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ldm_cli.config import VAEModelConfig


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest number of GroupNorm groups ≤ max_groups that divides `channels`."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1  # unreachable for channels ≥ 1; keeps type checkers content


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6)


# --------------------------------------------------------------------------- posterior


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag exp(logvar)) of Kingma & Welling (2014).

    `logvar` is clamped to [logvar_min, logvar_max] so that exp() can neither
    underflow to a zero σ nor overflow early in training.
    """

    def __init__(self, mean: Tensor, logvar: Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(f"mean shape {tuple(mean.shape)} and logvar shape {tuple(logvar.shape)} differ")
        self.mean = mean
        self.logvar = logvar.clamp(logvar_min, logvar_max)

    @property
    def var(self) -> Tensor:
        return self.logvar.exp()

    @property
    def std(self) -> Tensor:
        return (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample z = μ + σ·ε, ε ~ N(0, I) (Kingma & Welling 2014, §2.4).

        The noise is drawn on the generator's device (so a CPU generator gives the same
        sample whatever device the model runs on) and then moved to the mean's device.
        Without a generator it is `randn_like`, which torch.compile traces with dynamic shapes
        (`randn(shape)` of a symbolic shape stops it).
        """
        if generator is None:
            eps = torch.randn_like(self.mean, memory_format=torch.contiguous_format)
        else:
            eps = torch.randn(self.mean.shape, generator=generator, device=generator.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        """The most likely latent, μ."""
        return self.mean

    def kl(self) -> Tensor:
        """Elementwise KL(q ‖ N(0, I)) = ½·(μ² + σ² − 1 − log σ²) (Kingma & Welling 2014,
        appendix B). Returned unreduced, with the shape of `mean`, and in float32 whatever
        precision the network ran in (bf16 would round μ² + σ² − 1 − log σ² by ~2⁻⁸)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


# --------------------------------------------------------------------------- building blocks


class ResBlock(nn.Module):
    """x + F(x), F = (GroupNorm → SiLU → 3×3 conv) twice; a 1×1 conv on the skip when the
    channel count changes. The last conv of F starts at zero, so the block starts as the
    identity (or as the 1×1 skip) and deep stacks train stably from the first step."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConvDownsample(nn.Module):
    """Halve height and width with a stride-2 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ConvUpsample(nn.Module):
    """Double height and width: nearest-neighbour repeat, then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level_channels(cfg: VAEModelConfig) -> list[int]:
    return [cfg.base_channels * mult for mult in cfg.channel_mults]


# --------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    """Image (B, 3, H, W) → posterior moments (B, 2·latent_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEModelConfig) -> None:
        super().__init__()
        widths = level_channels(cfg)
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        channels = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(channels, width))
                channels = width
            if level < len(widths) - 1:
                layers.append(ConvDownsample(channels))
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(channels, channels)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) → image (B, 3, h·f, w·f); mirrors the encoder."""

    def __init__(self, cfg: VAEModelConfig) -> None:
        super().__init__()
        widths = level_channels(cfg)
        channels = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels, 3, padding=1)
        self.mid = ResBlock(channels, channels)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(channels, widths[level]))
                channels = widths[level]
            if level > 0:
                layers.append(ConvUpsample(channels))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------- the VAE


class VAE(nn.Module):
    """β-VAE (Kingma & Welling 2014; Higgins et al. 2017) over images in [-1, 1].

    `encode(x)` gives the posterior, `decode(z)` an (unbounded) image, and
    `forward(x)` decodes a reparameterised posterior sample: the reconstruction term
    and `posterior.kl()` together make the ELBO that `ldm_cli.training.vae_loss` weighs with β.
    """

    def __init__(self, cfg: VAEModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.downsample_factor = 2 ** (len(cfg.channel_mults) - 1)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(latent_channels, resolution/f, resolution/f) for a square image of side `resolution`."""
        f = self.downsample_factor
        if resolution <= 0 or resolution % f:
            raise ValueError(
                f"image resolution {resolution} must be a positive multiple of the VAE downsample factor {f}"
            )
        return (self.cfg.latent_channels, resolution // f, resolution // f)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image batch (B, 3, H, W) → posterior over (B, latent_channels, H/f, W/f)."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"VAE.encode expects images of shape (B, 3, H, W) with H and W multiples of {f}, "
                f"got {tuple(x.shape)}"
            )
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar, self.cfg.logvar_min, self.cfg.logvar_max)

    def decode(self, z: Tensor) -> Tensor:
        """Latent batch (B, latent_channels, h, w) → images (B, 3, h·f, w·f), unbounded."""
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """(reconstruction of a posterior sample, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior
