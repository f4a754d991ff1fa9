"""Image quality measures: PSNR, SSIM and MS-SSIM on images in [-1, 1].

SSIM follows Wang et al. 2004 (11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03;
on images smaller than the window, and at MS-SSIM's coarse scales, the window shrinks
to the image and σ with it),
computed on intensities mapped to [0, 1] (L = 1): its luminance term assumes
non-negative intensities and would exaggerate small shifts around 0. MS-SSIM follows
Wang et al. 2003 with the five standard scale weights, truncated to the scales the
image size allows; its last factor is the mean of the full SSIM map, as is usual.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATA_RANGE = 2.0  # images live in [-1, 1]
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB: 10·log10(L² / MSE), with L = 2 for [-1, 1] images."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(like)
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM map and mean contrast-structure map per image (Wang et al. 2004, eq. 13)."""
    x, y = (x + 1) / 2, (y + 1) / 2  # [-1, 1] → [0, 1]
    channels = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    size -= (size + 1) % 2  # keep it odd
    window = _gaussian_window(size, 1.5 * size / 11, channels, x)
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * contrast_structure).flatten(1).mean(1), contrast_structure.flatten(1).mean(1)


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """Per-image SSIM (1 for identical images), computed in float32."""
    return _ssim_terms(x.float(), y.float(), window_size)[0]


def ms_ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """Per-image multi-scale SSIM: ∏_j cs_j^{w_j} · l_M^{w_M} over the scales that fit."""
    x, y = x.float(), y.float()
    scales = max(1, min(len(MS_SSIM_WEIGHTS), int(math.log2(min(x.shape[-2:]) / 4)) + 1))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    factors = []
    for j in range(scales):
        full, cs = _ssim_terms(x, y, window_size)
        last = j == scales - 1
        factors.append((full if last else cs).clamp_min(1e-6) ** weights[j])
        if not last:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(factors).prod(0)
