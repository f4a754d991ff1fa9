"""ldm: a latent diffusion toolkit (β-VAE + v-parametrized ConvNeXt U-Net + DDPM/DDIM)."""

__version__ = "0.1.0"
