"""The optimiser: AdamW with decoupled weight decay, linear warm-up, then a constant or
cosine learning rate (docs/MATH.md, §9), and gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm_cli.config import OptimConfig


def learning_rate_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to 1, then constant or cosine decay to `min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and 1-D scales (Loshchilov & Hutter 2019)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)


def max_grad_norm(cfg: OptimConfig) -> float:
    """Max gradient norm for clipping; infinity when clipping is off (norm still measured)."""
    return cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
