"""Pixels as tensors: uint8 [0, 255] images and the float [-1, 1] range the models use."""

from __future__ import annotations

import torch


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255], clamped and rounded (NaN becomes mid-grey)."""
    scaled = (torch.nan_to_num(images.float(), nan=0.0) + 1.0) * 127.5
    return scaled.round().clamp(0, 255).to(torch.uint8)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a `(N, C, H, W)` batch left-right with probability 1/2."""
    device = generator.device if generator is not None else images.device
    flip = torch.rand(images.shape[0], generator=generator, device=device).to(images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
