"""One step of each reverse-process sampler: DDPM, DDIM and DPM-Solver++(2M).

Notation (docs/MATH.md, §1–4): code timesteps t = 0 … T−1, ``ᾱ_t`` from the schedule,
``t = −1`` for the clean latent (``ᾱ_{−1} = 1``), ``α_t = √ᾱ_t``, ``σ_t = √(1−ᾱ_t)``.
The denoiser predicts v; every step first turns v̂ into ẑ0 and ε̂
(`ldm_cli.diffusion.parametrization.predict_z0_eps`).

Every step has the signature ``step(schedule, z_t, t, t_next, v_hat, *, …)`` and
returns ``(z_next, ẑ0)``: it is pure, and its coefficients are Python floats read from
the float64 tables of the schedule, so a step costs a handful of tensor operations.
``t_next`` is the next timestep of the chain (−1: the clean latent). `SAMPLERS` is the
dispatch table the sampling loop (`ldm_cli.diffusion.sampling`) reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm_cli.diffusion.parametrization import predict_z0_eps
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.errors import UsageError

SPACINGS = ("trailing", "leading", "linspace")
DPM_MIN_STEP_RATIO = 0.5  # DPM-Solver++(2M) falls back to first order below this h_last/h


# --------------------------------------------------------------------------- arguments


def check_spacing(spacing: str) -> None:
    if spacing not in SPACINGS:
        raise UsageError(f"--spacing {spacing!r}: expected one of {', '.join(SPACINGS)}")


def check_steps(steps: int, available: int, t_start: int | None = None) -> None:
    """``steps`` must be an integer in 1 … available (T, or t_start + 1 for a partial chain)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= available:
        where = f"the model's T = {available}" if t_start is None else f"the {available} timesteps from t = {t_start}"
        raise UsageError(f"--steps {steps}: must be between 1 and {where}")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")


def check_sampler_args(
    sampler: str, steps: int | None, eta: float, clip_limit: float | None, spacing: str, timesteps: int,
    t_start: int | None = None,
) -> None:
    """The one validation of what a sampling call may ask for (exit 2 with the reason).

    ``timesteps`` is the schedule's T; a chain that starts at ``t_start`` can visit
    t_start + 1 of them.
    """
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    check_spacing(spacing)
    if t_start is not None and not 0 <= t_start < timesteps:
        raise UsageError(f"t_start {t_start}: must be in 0..{timesteps - 1}")
    available = timesteps if t_start is None else t_start + 1
    if steps is not None:
        if SAMPLERS[sampler].every_timestep:
            raise UsageError(
                f"the {sampler} sampler uses every timestep ({available} from t={available - 1}), so --steps "
                f"{steps} cannot be set; use --sampler ddim or dpm++2m for fewer steps"
            )
        check_steps(steps, available, None if available == timesteps else t_start)
    if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise UsageError(f"--eta {eta}: must be in [0, 1]")
    if eta > 0 and not SAMPLERS[sampler].takes_eta:
        raise UsageError(f"--eta applies to the ddim sampler only, not {sampler}")
    if clip_limit is not None and not (math.isfinite(clip_limit) and clip_limit > 0):
        raise UsageError(f"--clip-limit {clip_limit}: must be a positive number")


# --------------------------------------------------------------------------- timesteps


def sampling_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """``steps`` distinct code timesteps in 0 … T−1, descending; the chain starts at the first.

    The step from the last listed timestep goes to the clean latent (ᾱ_prev = 1).
    Spacings (names as in diffusers; Lin et al. 2024, Table 2):

    * ``trailing``:  ``t_i = T − 1 − ⌊i·T/steps⌋``  — starts at T−1, the pure-noise end.
    * ``leading``:   ``t_i = (steps − 1 − i)·⌊T/steps⌋`` — ends at 0, starts below T−1.
    * ``linspace``:  ``t_i = round((steps − 1 − i)·(T − 1)/(steps − 1))`` — both ends;
      the stride is not constant, so the next timestep must be read from this list.
    """
    T = num_train_timesteps
    check_spacing(spacing)
    check_steps(steps, T)
    if spacing == "trailing":
        return [T - 1 - (i * T) // steps for i in range(steps)]
    if spacing == "leading":
        return [(steps - 1 - i) * (T // steps) for i in range(steps)]
    if steps == 1:
        return [T - 1]
    # round half up in exact integer arithmetic: ⌊(2·j·(T−1) + (steps−1)) / (2·(steps−1))⌋
    return [(2 * j * (T - 1) + steps - 1) // (2 * (steps - 1)) for j in range(steps - 1, -1, -1)]


# --------------------------------------------------------------------------- steps


def ddpm_step(
    schedule: NoiseSchedule, z_t: torch.Tensor, t: int, t_next: int, v_hat: torch.Tensor, *,
    noise: torch.Tensor | None = None, clip_limit: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral step z_t → z_next from the posterior q(z_next | z_t, ẑ0) (Ho et al. 2020).

    With ``ᾱ_next`` (1 when ``t_next == −1``) and, for strided chains, the step's own
    ``β = 1 − ᾱ_t/ᾱ_next``, ``α = 1 − β`` (docs/MATH.md, §4.1):

        μ  = (z_t − β/σ_t·ε̂) / √α                       (eq. 11)
        σ² = β·(1−ᾱ_next)/(1−ᾱ_t)                       (β̃_t, eq. 7)
        z_next = μ + σ·noise,   noise ~ N(0, I)

    σ = 0 on the step to the clean latent, where ``noise`` may be None.
    """
    z0_hat, eps_hat = predict_z0_eps(schedule, z_t, t, v_hat, clip_limit)
    alpha_bar_t, alpha_bar_next = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_next)
    beta = 1.0 - alpha_bar_t / alpha_bar_next
    alpha = 1.0 - beta
    mean = (z_t - (beta / math.sqrt(1.0 - alpha_bar_t)) * eps_hat) / math.sqrt(alpha)
    if t_next == -1:
        return mean, z0_hat
    sigma = math.sqrt(beta * (1.0 - alpha_bar_next) / (1.0 - alpha_bar_t))
    if noise is None:
        raise ValueError(f"ddpm_step from t={t} to t={t_next} needs noise")
    return mean + sigma * noise, z0_hat


def ddim_sigma(alpha_bar_t: float, alpha_bar_next: float, eta: float) -> float:
    """``σ = η·√((1−ᾱ_next)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_next)`` (Song et al. 2021, eq. 16)."""
    return eta * math.sqrt((1.0 - alpha_bar_next) / (1.0 - alpha_bar_t)) * math.sqrt(1.0 - alpha_bar_t / alpha_bar_next)


def ddim_step(
    schedule: NoiseSchedule, z_t: torch.Tensor, t: int, t_next: int, v_hat: torch.Tensor, *,
    eta: float = 0.0, noise: torch.Tensor | None = None, clip_limit: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM step z_t → z_next (Song et al. 2021, eq. 12; their α is our ᾱ; docs/MATH.md, §4.2).

        z_next = α_next·ẑ0 + √(1−ᾱ_next−σ²)·ε̂ + σ·noise,
        σ = η·√((1−ᾱ_next)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_next)

    η = 0 is deterministic; η = 1 is the DDPM posterior.
    """
    z0_hat, eps_hat = predict_z0_eps(schedule, z_t, t, v_hat, clip_limit)
    alpha_bar_t, alpha_bar_next = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_next)
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_next, eta)
    direction = math.sqrt(max(1.0 - alpha_bar_next - sigma**2, 0.0))  # "direction pointing to z_t"
    z_next = math.sqrt(alpha_bar_next) * z0_hat + direction * eps_hat
    if sigma > 0.0:
        if noise is None:
            raise ValueError(f"ddim_step with eta={eta} from t={t} to t={t_next} needs noise")
        z_next = z_next + sigma * noise
    return z_next, z0_hat


def log_snr_half(alpha_bar: float) -> float:
    """``λ = log(α/σ)``, half the log-SNR (Lu et al. 2022); +∞ for the clean latent."""
    return math.inf if alpha_bar >= 1.0 else 0.5 * math.log(alpha_bar / (1.0 - alpha_bar))


def dpm_solver_pp_2m_step(
    schedule: NoiseSchedule, z_t: torch.Tensor, t: int, t_next: int, v_hat: torch.Tensor, *,
    previous: tuple[int, torch.Tensor] | None = None, clip_limit: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) step z_t → z_next (Lu et al. 2022, Algorithm 2; docs/MATH.md, §4.3).

    Data-prediction form with λ = log(α/σ) and ``h = λ_next − λ_t``:

        z_next = (σ_next/σ_t)·z_t − α_next·(e^{−h} − 1)·D

    With the previous step's timestep and prediction, ``previous = (t_last, ẑ0_last)``,
    ``r = h_last/h`` and ``D = (1 + 1/(2r))·ẑ0 − (1/(2r))·ẑ0_last``: second order.
    The step is first order (``D = ẑ0``, exactly DDIM η=0) when there is no previous
    evaluation, and also when ``r < 1/2``: D extrapolates ẑ0 linearly in λ, which is
    not trusted over more than twice the span it was fitted on (with 'linspace' or
    'leading' spacing the step to t = 0 is several times longer in λ than the one
    before, and the second-order update overshoots there). The step to the clean
    latent (σ_next = 0, h = ∞) lands exactly on ẑ0.
    """
    z0_hat, _ = predict_z0_eps(schedule, z_t, t, v_hat, clip_limit)
    if t_next == -1:
        return z0_hat, z0_hat
    alpha_bar_t, alpha_bar_next = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_next)
    lambda_t, lambda_next = log_snr_half(alpha_bar_t), log_snr_half(alpha_bar_next)
    h = lambda_next - lambda_t
    d = z0_hat
    if previous is not None:
        t_last, z0_last = previous
        r = (lambda_t - log_snr_half(schedule.alpha_bar_at(t_last))) / h
        if r >= DPM_MIN_STEP_RATIO:
            d = (1.0 + 1.0 / (2.0 * r)) * z0_hat - (1.0 / (2.0 * r)) * z0_last
    sigma_ratio = math.sqrt((1.0 - alpha_bar_next) / (1.0 - alpha_bar_t))
    return sigma_ratio * z_t - math.sqrt(alpha_bar_next) * math.expm1(-h) * d, z0_hat


# --------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class Sampler:
    """How the sampling loop drives one sampler's step."""

    step: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    every_timestep: bool = False  # DDPM: visits all timesteps, `steps` cannot be set
    takes_eta: bool = False  # DDIM: passes η (stochastic when η > 0)
    multistep: bool = False  # DPM-Solver++(2M): passes the previous (t, ẑ0)

    def is_stochastic(self, eta: float) -> bool:
        return self.every_timestep or (self.takes_eta and eta > 0.0)

    def options(self, eta: float, noise: torch.Tensor | None, previous: tuple[int, torch.Tensor] | None) -> dict:
        """The keyword arguments of this sampler's step beyond ``clip_limit``."""
        if self.multistep:
            return {"previous": previous}
        return {"eta": eta, "noise": noise} if self.takes_eta else {"noise": noise}


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_step, every_timestep=True),
    "ddim": Sampler(ddim_step, takes_eta=True),
    "dpm++2m": Sampler(dpm_solver_pp_2m_step, multistep=True),
}
