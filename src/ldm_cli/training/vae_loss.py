"""The β-VAE objective with a decaying β (docs/MATH.md, §8).

β-VAE (Higgins et al. 2017; Kingma & Welling 2014):
    L = rec(x, x̂) + w_s·(1 − SSIM(x, x̂)) + β(step)·KL(q(z|x) ‖ N(0, I))
with rec the per-pixel mean L1 or MSE and KL the mean over latent elements. β relaxes
from `beta_start` to `beta_final` over `beta_decay_steps`, so early training keeps the
latent space smooth and late training sharpens reconstructions.

The diffusion loss lives with the v-parametrization, in `ldm_cli.diffusion.parametrization`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ldm_cli.config import VAELossConfig
from ldm_cli.evaluation.image_metrics import ms_ssim, ssim
from ldm_cli.models.vae import DiagonalGaussian


def beta_at(step: int, cfg: VAELossConfig) -> float:
    """β after `step` updates: from beta_start to beta_final, then constant."""
    if cfg.beta_decay_steps == 0:
        return cfg.beta_final
    progress = min(max(step / cfg.beta_decay_steps, 0.0), 1.0)
    start, final = cfg.beta_start, cfg.beta_final
    if cfg.beta_decay_shape == "linear":
        return start + (final - start) * progress
    if cfg.beta_decay_shape == "cosine":
        return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return start * (final / start) ** progress  # exponential: geometric interpolation


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, cfg: VAELossConfig) -> torch.Tensor:
    """Per-pixel mean L1 or MSE, plus the weighted structural term (1 − (MS-)SSIM)."""
    if cfg.reconstruction == "l1":
        loss = F.l1_loss(x_hat, x)
    else:
        loss = F.mse_loss(x_hat, x)
    if cfg.structural_weight > 0:
        structural = ssim if cfg.structural == "ssim" else ms_ssim
        loss = loss + cfg.structural_weight * (1.0 - structural(x_hat, x).mean())
    return loss


def vae_loss(
    x: torch.Tensor, x_hat: torch.Tensor, posterior: DiagonalGaussian, beta: float, cfg: VAELossConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The β-VAE objective and its parts for logging."""
    rec = reconstruction_loss(x.float(), x_hat.float(), cfg)
    kl = posterior.kl().mean()
    loss = rec + beta * kl
    return loss, {"reconstruction": rec.item(), "kl": kl.item(), "beta": beta}
