"""Noise schedules: β_t, ᾱ_t and the forward process q(z_t | z0).

Conventions (docs/MATH.md, §1):

* Timesteps are code indices ``t = 0 … T−1``. ``ᾱ_t = ∏_{i≤t} (1 − β_i)``. The clean
  latent sits "before" index 0; we write it as ``t = −1`` with ``ᾱ_{−1} = 1``.
* ``α_t = √ᾱ_t`` and ``σ_t = √(1−ᾱ_t)`` (Salimans & Ho's notation).
* Forward process (Ho et al. 2020, eq. 4):  ``z_t = α_t·z0 + σ_t·ε``.

What the denoiser predicts and how it is trained live in `ldm_cli.diffusion.parametrization`.

Everything is computed once in float64 and stored as tables; the methods gather
the entries they need and cast them to the dtype and device of their input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm_cli.config import DiffusionConfig
from ldm_cli.errors import UsageError

SCHEDULE_KINDS = ("linear", "cosine", "sigmoid")
MAX_BETA = 0.999  # β clip of Nichol & Dhariwal 2021 (§3.2), used for cosine and sigmoid
COSINE_S = 0.008  # offset s of the cosine schedule (Nichol & Dhariwal 2021, eq. 17)
SIGMOID_START, SIGMOID_END, SIGMOID_TAU = -3.0, 3.0, 1.0  # Chen 2023, Algorithm 1
WARN_LAST_ALPHA_BAR = 0.1  # ᾱ_{T−1} above this: the last latent is not close to noise


# --------------------------------------------------------------------------- betas


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """β_t evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020, §4)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def betas_from_alpha_bar_curve(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Discretise a continuous ᾱ(t) given at t = 0 … T into T betas.

    ``β_t = 1 − ᾱ(t+1)/ᾱ(t)`` for code index t = 0 … T−1, clipped at 0.999
    (Nichol & Dhariwal 2021, §3.2). The curve is normalised by ᾱ(0) first, so that
    ``∏_{i≤t}(1−β_i) = ᾱ(t+1)/ᾱ(0)`` wherever the clip is inactive.
    """
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=MAX_BETA)


def cosine_alpha_bar_curve(timesteps: int, s: float = COSINE_S) -> torch.Tensor:
    """``f(t) = cos²(((t/T + s)/(1 + s))·π/2)`` for t = 0 … T (Nichol & Dhariwal 2021, eq. 17)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64)
    return torch.cos((t / timesteps + s) / (1 + s) * (math.pi / 2)) ** 2


def sigmoid_alpha_bar_curve(
    timesteps: int, start: float = SIGMOID_START, end: float = SIGMOID_END, tau: float = SIGMOID_TAU
) -> torch.Tensor:
    """γ(τ) of Chen 2023 ("On the importance of noise scheduling", Algorithm 1) at τ = t/T.

    ``γ(τ) = (v_end − sigmoid((τ·(end−start) + start)/tau)) / (v_end − v_start)`` with
    ``v_start = sigmoid(start/tau)`` and ``v_end = sigmoid(end/tau)``: a signal level
    (ᾱ) that falls from 1 at τ = 0 to 0 at τ = 1. Chen's ``clip_min`` is not needed:
    the β clip at 0.999 bounds the last step instead.
    """
    tau_grid = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    output = torch.sigmoid((tau_grid * (end - start) + start) / tau)
    return (v_end - output) / (v_end - v_start)


def make_betas(kind: str, timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The float64 β table of a schedule kind; bad arguments raise `UsageError`."""
    if kind not in SCHEDULE_KINDS:
        raise UsageError(f"unknown noise schedule {kind!r}: expected one of {', '.join(SCHEDULE_KINDS)}")
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise UsageError(f"noise schedule timesteps must be an integer >= 1, got {timesteps!r}")
    if kind == "linear":
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise UsageError(f"linear schedule needs 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        return linear_betas(timesteps, beta_start, beta_end)
    if kind == "cosine":
        return betas_from_alpha_bar_curve(cosine_alpha_bar_curve(timesteps))
    return betas_from_alpha_bar_curve(sigmoid_alpha_bar_curve(timesteps))


# --------------------------------------------------------------------------- schedule


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape (B,) → (B, 1, …, 1) with ``like.ndim`` dimensions, in like's dtype/device."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).to(like.dtype)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """β_t, ᾱ_t and the closed-form relations of the forward process, for t = 0 … T−1.

    Build one with `NoiseSchedule.create` (or `from_config` / `from_metadata`).
    Tables are float64 tensors of shape (T,); methods that take a timestep tensor
    accept ``t = −1`` for the clean latent (ᾱ = 1).
    """

    kind: str
    timesteps: int
    beta_start: float
    beta_end: float
    betas: torch.Tensor  # β_t
    alphas: torch.Tensor  # α_t = 1 − β_t  (Ho et al.'s α, not Salimans & Ho's)
    alphas_cumprod: torch.Tensor  # ᾱ_t = ∏_{i≤t} α_i
    sqrt_alphas_cumprod: torch.Tensor  # √ᾱ_t        (Salimans & Ho's α_t)
    sqrt_one_minus_alphas_cumprod: torch.Tensor  # √(1−ᾱ_t)   (Salimans & Ho's σ_t)
    # Index t+1 holds the value at t, index 0 the clean latent (t = −1): float64 (T+1,).
    _padded: dict[str, torch.Tensor] = field(repr=False)
    # The same padded ᾱ as Python floats, for samplers that step with scalar coefficients.
    _alpha_bar_floats: tuple[float, ...] = field(repr=False)
    _device_cache: dict[Any, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ building

    @classmethod
    def create(cls, kind: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """Schedule ``kind`` ('linear', 'cosine' or 'sigmoid') with T = ``timesteps``.

        ``beta_start``/``beta_end`` are used by the linear schedule only.
        """
        betas = make_betas(kind, timesteps, float(beta_start), float(beta_end))
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        padded_alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod])
        padded = {
            "alpha_bar": padded_alpha_bar,
            "sqrt_alpha_bar": padded_alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - padded_alpha_bar).sqrt(),
        }
        return cls(
            kind=kind,
            timesteps=timesteps,
            beta_start=float(beta_start),
            beta_end=float(beta_end),
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            _padded=padded,
            _alpha_bar_floats=tuple(padded_alpha_bar.tolist()),
        )

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        """The schedule described by the ``[diffusion]`` config section."""
        return cls.create(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end)

    def to_metadata(self) -> dict[str, str | int | float]:
        """JSON-able description that `from_metadata` rebuilds the same tables from."""
        return {
            "kind": self.kind,
            "timesteps": self.timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> NoiseSchedule:
        """Inverse of `to_metadata`; values may also be strings (safetensors metadata)."""
        try:
            return cls.create(
                str(meta["kind"]), int(meta["timesteps"]), float(meta["beta_start"]), float(meta["beta_end"])
            )
        except KeyError as err:
            raise UsageError(f"schedule metadata lacks the key {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise UsageError(f"schedule metadata has a bad value: {err}") from None

    # ------------------------------------------------------------------ lookups

    def alpha_bar_at(self, t: int) -> float:
        """ᾱ_t as a Python float for one integer t in −1 … T−1 (ᾱ_{−1} = 1, clean)."""
        return self._alpha_bar_floats[t + 1]

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """Padded float64 table ``name`` on ``device`` (copied there once, then cached)."""
        if device.type == "cpu":
            return self._padded[name]
        tables = self._device_cache.get(device)
        if tables is None:
            tables = {key: value.to(device) for key, value in self._padded.items()}
            self._device_cache[device] = tables
        return tables[name]

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Entries of table ``name`` at integer timesteps t (B,), broadcast and cast to ``like``."""
        t = torch.as_tensor(t, device=like.device).long()
        values = self._table(name, like.device)[t.reshape(-1) + 1]
        return _broadcast(values, like)

    def scalings(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) = (√ᾱ_t, √(1−ᾱ_t)) at integer timesteps t (B,), gathered in float64,
        then broadcast and cast to ``like`` (docs/MATH.md, §1); ``t = −1`` gives (1, 0)."""
        return self._gather("sqrt_alpha_bar", t, like), self._gather("sqrt_one_minus_alpha_bar", t, like)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """``SNR(t) = ᾱ_t/(1−ᾱ_t)`` (Kingma et al. 2021), float64, shape of t."""
        t = torch.as_tensor(t).long()
        alpha_bar = self._table("alpha_bar", t.device)[t + 1]
        return alpha_bar / (1.0 - alpha_bar)

    # ------------------------------------------------------------------ the forward process

    def add_noise(self, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sample q(z_t | z0):  ``z_t = α_t·z0 + σ_t·ε``  (Ho et al. 2020, eq. 4; docs/MATH.md, §1)."""
        alpha, sigma = self.scalings(t, z0)
        return alpha * z0 + sigma * eps

    # ------------------------------------------------------------------ reporting

    def table(self) -> list[tuple[int, float, float]]:
        """Rows ``(t, β_t, ᾱ_t)`` for t = 0 … T−1, for printing or CSV."""
        return [
            (t, beta, alpha_bar)
            for t, (beta, alpha_bar) in enumerate(zip(self.betas.tolist(), self.alphas_cumprod.tolist()))
        ]


def linear_schedule_warning(schedule: NoiseSchedule) -> str | None:
    """One line when ᾱ at the last step exceeds 0.1, else None.

    Sampling starts from pure noise N(0, I), which matches z_{T−1} only if ᾱ_{T−1} ≈ 0.
    The linear schedule with the DDPM range (1e-4 … 0.02) at small T leaves most of the
    signal in the last latent (T = 10: ᾱ_9 ≈ 0.90), so samples come out wrong.
    """
    last = schedule.alpha_bar_at(schedule.timesteps - 1)
    if last <= WARN_LAST_ALPHA_BAR:
        return None
    return (
        f"the {schedule.kind} schedule with T={schedule.timesteps} keeps ᾱ={last:.3f} of the signal at its "
        f"last step (more than {WARN_LAST_ALPHA_BAR}), so sampling from pure noise does not match training; "
        "use more timesteps, larger betas or the cosine schedule"
    )
