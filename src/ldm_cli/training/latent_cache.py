"""The latent cache: the denoiser's training set, encoded once (RUN/latent-cache.safetensors).

It holds the posterior mean μ and standard deviation σ of every training image (and of
its mirror image when flipping is on), so training draws a fresh z = μ + σ·ε each time
without running the encoder. Its key — the VAE file's digest, the data config and the
image count — is stored in the file's metadata; a cache whose key differs, or that does
not load, is rebuilt, never trusted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_cli.common.files import atomic_write, file_sha256, require_free_space
from ldm_cli.config import DenoiserRunConfig
from ldm_cli.data.cache import ImageSet
from ldm_cli.modelfiles.bundles import VAEBundle
from ldm_cli.models.latent_stats import encode_posteriors, encoding_progress
from ldm_cli.models.vae import VAE
from ldm_cli.training import rundir


@dataclass(frozen=True)
class LatentCache:
    """Posterior μ and σ of each training example; rows [N, 2N) are the mirrored images."""

    mean: torch.Tensor  # (N or 2N, C, h, w) float32
    std: torch.Tensor

    def __len__(self) -> int:
        return len(self.mean)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """μ and σ of the chosen examples stacked on a new dim 1: (B, 2, C, h, w)."""
        return torch.stack((self.mean[indices], self.std[indices]), dim=1)


def build_latent_cache(
    vae: VAE, images: torch.Tensor, batch_size: int, device: torch.device | str, flip: bool,
    show_progress: bool | None = None,
) -> LatentCache:
    """Encode the training set once (and its mirror images when flipping is on), showing
    progress in images encoded (`show_progress` None: when this process prints)."""
    total = len(images) * (2 if flip else 1)
    with encoding_progress("latent cache: encode", total, show_progress) as progress:
        mean, std = encode_posteriors(vae, images, batch_size, device, progress=progress)
        if flip:
            mean_f, std_f = encode_posteriors(vae, images, batch_size, device, flip=True, progress=progress)
            mean, std = torch.cat((mean, mean_f)), torch.cat((std, std_f))
    return LatentCache(mean=mean, std=std)


def sample_posterior(stats_batch: torch.Tensor) -> torch.Tensor:
    """z = μ + σ·ε from a cache batch of shape (B, 2, C, h, w)."""
    mean, std = stats_batch[:, 0], stats_batch[:, 1]
    return mean + std * torch.randn_like(std)


def latent_cache_key(config: DenoiserRunConfig, vae_path: str, images: ImageSet) -> str:
    """What the cache depends on: the VAE file, the data config and the image count."""
    data = config.data.model_dump(mode="json", exclude={"cache_dir"})
    return json.dumps({"vae": file_sha256(vae_path), "data": data, "train_images": len(images.train)}, sort_keys=True)


def load_or_build_latent_cache(
    config: DenoiserRunConfig, vae: VAEBundle, vae_path: str, images: ImageSet, run_dir: Path, device: torch.device,
    is_main: bool,
) -> LatentCache:
    """Reuse RUN/latent-cache.safetensors when its key matches, else encode (main process writes)."""
    path = run_dir / rundir.LATENT_CACHE
    key = latent_cache_key(config, vae_path, images)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                stored_key = (f.metadata() or {}).get("key")
            if stored_key == key:
                tensors = load_file(str(path))
                return LatentCache(mean=tensors["mean"], std=tensors["std"])
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    cache = build_latent_cache(vae.network, images.train, config.latents.encode_batch_size, device, config.data.flip,
                               show_progress=is_main)
    if is_main:
        needed = 2 * cache.mean.numel() * cache.mean.element_size() + (1 << 20)
        require_free_space(path.parent, needed, "the latent cache")
        with atomic_write(path) as tmp:
            save_file({"mean": cache.mean.contiguous(), "std": cache.std.contiguous()}, str(tmp), metadata={"key": key})
    return cache
