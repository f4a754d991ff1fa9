"""Neural networks of `ldm`: the β-VAE (`vae.py`) and the ConvNeXt U-Net denoiser (`unet.py`)."""

from __future__ import annotations

from ldm_cli.models.unet import UNet, timestep_embedding
from ldm_cli.models.vae import VAE, DiagonalGaussian

__all__ = ["VAE", "DiagonalGaussian", "UNet", "timestep_embedding"]
