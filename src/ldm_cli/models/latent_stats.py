"""The latent space the denoiser sees: VAE posterior samples, normalised per channel.

Latents fed to the denoiser are normalised to zero mean and unit variance per channel,
``z_n = (z − mean)/std``, with statistics measured on posterior samples z = μ + σ·ε of
the training set, not on the means alone (docs/MATH.md, §6). The statistics travel in
both exported files; `ldm_cli.modelfiles.bundles.VAEBundle` applies them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ldm_cli.common.progress import ProgressReporter
from ldm_cli.data.pixels import to_float
from ldm_cli.models.vae import VAE


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and standard deviation of posterior samples: z_n = (z − mean)/std."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)

    def _shaped(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like).view(1, -1, *([1] * (like.ndim - 2)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._shaped(self.mean, z)) / self._shaped(self.std, z)

    def denormalize(self, z_n: torch.Tensor) -> torch.Tensor:
        return z_n * self._shaped(self.std, z_n) + self._shaped(self.mean, z_n)

    def scaled(self, b: float) -> "LatentStats":
        """Statistics that normalise to std b instead of 1: z_n = b·(z − mean)/std, the input
        scaling of Chen 2023 ("On the Importance of Noise Scheduling for Diffusion Models")."""
        return self if b == 1.0 else LatentStats(mean=self.mean, std=self.std / b)

    def tensors(self, prefix: str = "latent_stats") -> dict[str, torch.Tensor]:
        return {f"{prefix}.mean": self.mean.float(), f"{prefix}.std": self.std.float()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "latent_stats") -> "LatentStats":
        return cls(mean=tensors[f"{prefix}.mean"].float(), std=tensors[f"{prefix}.std"].float())


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def encoding_progress(description: str, images: int, enabled: bool | None = None) -> ProgressReporter:
    """Progress of encoding `images` images, counted in images."""
    return ProgressReporter(description, images, enabled=enabled, unit="images")


def _reporting(progress: ProgressReporter | None, images: int) -> AbstractContextManager[ProgressReporter]:
    """The caller's reporter (left running), or one of its own for these images."""
    return nullcontext(progress) if progress is not None else encoding_progress("encode latents", images)


@torch.no_grad()
def encode_posteriors(
    vae: VAE, images: torch.Tensor, batch_size: int, device: torch.device | str = "cpu", flip: bool = False,
    progress: ProgressReporter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (μ, σ) of every uint8 image, as float32 CPU tensors (N, C, h, w).

    Each batch advances `progress` by its images (without one, a reporter of its own shows)."""
    means, stds = [], []
    vae.eval()
    with _reporting(progress, len(images)) as bar:
        for batch in _batches(images, batch_size):
            x = to_float(batch.to(device))
            if flip:
                x = x.flip(-1)
            posterior = vae.encode(x)
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
            bar.advance(by=len(batch))
    return torch.cat(means), torch.cat(stds)


def stats_of_posterior_samples(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> LatentStats:
    """Per-channel mean and std of z = μ + σ·ε over all examples and positions (float64)."""
    z = mean.double() + std.double() * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
    channels = z.transpose(0, 1).flatten(1)
    return LatentStats(mean=channels.mean(1).float(), std=channels.std(1).clamp_min(1e-6).float())


def measure_latent_stats(
    vae: VAE, images: torch.Tensor, batch_size: int = 64, device: torch.device | str = "cpu", seed: int = 0
) -> LatentStats:
    """Encode `images` and measure the statistics of their posterior samples."""
    with encoding_progress("measure latent statistics: encode", len(images)) as progress:
        mean, std = encode_posteriors(vae, images, batch_size, device, progress=progress)
    return stats_of_posterior_samples(mean, std, torch.Generator().manual_seed(seed))
