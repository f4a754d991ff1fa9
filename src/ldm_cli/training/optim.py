"""The optimiser: AdamW with decoupled weight decay, linear warm-up, then a constant or
cosine learning rate (docs/MATH.md, §9), gradient clipping, and the EMA of the weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm_cli.config import OptimConfig, TrainConfig
from ldm_cli.models.ema import EMA


def learning_rate_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to 1, then constant or cosine decay to `min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


KERNEL_KEYS = ("fused", "foreach")  # how torch runs the update, not what it computes


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and 1-D scales (Loshchilov & Hutter 2019).

    With `optim.fused` (the default) torch's fused kernel updates every parameter in one
    pass: the same update as its per-tensor loop up to float rounding, 1.5 against 7.2 ms
    per step for the quickstart denoiser on a 2-core CPU, where the loop was a tenth of the
    whole update (benchmarks/README.md, fifth study). Torch decides where the kernel exists
    (`torch.utils._foreach_utils._get_fused_kernels_supported_devices`)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=cfg.fused)


def make_ema(model: nn.Module, cfg: TrainConfig) -> EMA | None:
    """The EMA of `model` that `train.ema_decay` and `train.ema_gamma` ask for; None when the decay is 0."""
    return EMA(model, cfg.ema_decay, cfg.ema_gamma) if cfg.ema_decay > 0 else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's optimiser state, keeping the kernel this run chose.

    torch's `load_state_dict` would restore the saved groups' `fused` and `foreach` flags
    too, so a run resumed with another `optim.fused` (or from a checkpoint written before
    the option existed) would silently go on with the old kernel."""
    current = {key: optimizer.param_groups[0].get(key) for key in KERNEL_KEYS}
    groups = [{**group, **current} for group in saved["param_groups"]]
    optimizer.load_state_dict({**saved, "param_groups": groups})


def max_grad_norm(cfg: OptimConfig) -> float:
    """Max gradient norm for clipping; infinity when clipping is off (norm still measured)."""
    return cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
