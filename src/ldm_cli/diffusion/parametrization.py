"""The v-parametrization and the denoiser's loss — the one home of both (docs/MATH.md, §2–3).

The denoiser predicts ``v_t = α_t·ε − σ_t·z0`` (Salimans & Ho 2022, §4), with
``α_t = √ᾱ_t`` and ``σ_t = √(1−ᾱ_t)``. Since ``(α_t, σ_t)`` is a rotation angle,
``z_t`` and ``v_t`` are an orthonormal pair of (z0, ε) and inverting is a rotation back
(App. D):

    ẑ0 = α_t·z_t − σ_t·v̂        ε̂ = σ_t·z_t + α_t·v̂

Training minimises ``w(t)·‖v̂(z_t, t) − v_t‖²`` with ``t ~ U{0, …, T−1}`` (or
logit-normal, `draw_timesteps`), where ``w(t) = 1`` (the plain v-MSE) or the min-SNR-γ
weight ``min(SNR_t, γ)/(SNR_t + 1)`` (Hang et al. 2023, written for v-targets).

Every function takes the timestep either as a Python int (the samplers: one timestep
for the whole batch, scalar coefficients) or as a LongTensor (B,) (training: one
timestep per sample, coefficients broadcast over each sample).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm_cli.diffusion.schedules import NoiseSchedule

Timestep = int | torch.Tensor


def alpha_sigma(schedule: NoiseSchedule, t: Timestep, like: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """``(α_t, σ_t) = (√ᾱ_t, √(1−ᾱ_t))``: floats for an int t, else tensors broadcast to ``like``."""
    if isinstance(t, int):
        alpha_bar = schedule.alpha_bar_at(t)
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return schedule.scalings(t, like)


def v_target(schedule: NoiseSchedule, z0: torch.Tensor, t: Timestep, eps: torch.Tensor) -> torch.Tensor:
    """``v_t = α_t·ε − σ_t·z0`` (Salimans & Ho 2022, §4)."""
    alpha, sigma = alpha_sigma(schedule, t, z0)
    return alpha * eps - sigma * z0


def predict_z0_eps(
    schedule: NoiseSchedule, z_t: torch.Tensor, t: Timestep, v_hat: torch.Tensor, clip_limit: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ẑ0, ε̂) from the prediction v̂ at timestep t (Salimans & Ho 2022, App. D).

    ``ẑ0 = α_t·z_t − σ_t·v̂`` and ``ε̂ = σ_t·z_t + α_t·v̂``. With ``clip_limit`` c, ẑ0 is
    clamped to [−c, c] and ε̂ recomputed from the clamped ẑ0, ``ε̂ = (z_t − α_t·ẑ0)/σ_t``,
    so that ``z_t = α_t·ẑ0 + σ_t·ε̂`` still holds (docs/MATH.md, §2).
    """
    alpha, sigma = alpha_sigma(schedule, t, z_t)
    z0_hat = alpha * z_t - sigma * v_hat
    if clip_limit is None:
        return z0_hat, sigma * z_t + alpha * v_hat
    z0_hat = z0_hat.clamp(-clip_limit, clip_limit)
    return z0_hat, (z_t - alpha * z0_hat) / sigma


def min_snr_weight(snr: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample weight of the v-MSE: 1, or ``min(SNR, γ)/(SNR + 1)`` with min-SNR-γ."""
    if gamma is None:
        return torch.ones_like(snr)
    return snr.clamp(max=gamma) / (snr + 1.0)


def draw_timesteps(count: int, timesteps: int, how: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Training timesteps, a LongTensor (count,) in {0, …, T−1} (docs/MATH.md, §3):

        uniform        t ~ U{0, …, T−1}
        logit-normal   t = ⌊T·s(u)⌋ with u ~ N(0, 1) and s the logistic sigmoid (Esser et al.
                       2024, §3.1): more updates in the middle of the chain, fewer at its ends.
    """
    if how == "uniform":
        return torch.randint(0, timesteps, (count,), device=device)
    if how == "logit-normal":
        u = torch.randn(count, device=device)
        return (timesteps * torch.sigmoid(u)).long().clamp(0, timesteps - 1)
    raise ValueError(f"unknown timestep sampling {how!r}")


def weighted_mse(v_hat: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the batch of each sample's mean squared error ‖v̂ − v‖²."""
    per_sample = (v_hat.float() - v.float()).pow(2).flatten(1).mean(1)
    return (weights * per_sample).mean()


SELF_CONDITION_RATE = 0.5  # share of batches that feed the network its own estimate (Chen et al. 2023)


class VPredictionLoss:
    """``L = E_t[w(t)·‖v̂(z_t, t) − v_t‖²]`` with ``z_t = α_t·z0 + σ_t·ε`` (docs/MATH.md, §3).

    In the manner of EDM's loss classes: built from the schedule and the weighting,
    called with the model and a batch of clean latents, timesteps and noise.

    With ``self_condition`` the network also takes an estimate of z0 (Chen et al. 2023,
    "Analog Bits", §3): on a share SELF_CONDITION_RATE of the batches (one draw per call) it is the network's
    own ẑ0 from a first pass without gradient, ``ẑ0 = α_t·z_t − σ_t·v̂(z_t, t, 0)``, else
    zeros; the loss is that of the second pass, ``v̂(z_t, t, sg(ẑ0))``.
    """

    def __init__(self, schedule: NoiseSchedule, min_snr_gamma: float | None = None, self_condition: bool = False):
        self.schedule, self.min_snr_gamma, self.self_condition = schedule, min_snr_gamma, self_condition

    def weight(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return min_snr_weight(self.schedule.snr(t).to(like), self.min_snr_gamma)

    def self_estimate(self, model: nn.Module, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The z0 estimate fed to a self-conditioned network: its own first guess, or zeros."""
        if torch.rand(()) >= SELF_CONDITION_RATE:
            return torch.zeros_like(z_t)
        with torch.no_grad():
            v_first = model(z_t, t, torch.zeros_like(z_t))
        return predict_z0_eps(self.schedule, z_t, t, v_first.to(z_t.dtype))[0]

    def __call__(self, model: nn.Module, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        z_t = self.schedule.add_noise(z0, t, noise)
        v_hat = model(z_t, t, self.self_estimate(model, z_t, t)) if self.self_condition else model(z_t, t)
        return weighted_mse(v_hat, v_target(self.schedule, z0, t, noise), self.weight(t, z0))
