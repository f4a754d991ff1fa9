"""Sampling loops: the reverse chain from noise (or from a noised latent) to clean latents.

`sample` runs one batch through the chain of `plan_timesteps`, calling the model once
per step and the step function of the chosen sampler (`ldm_cli.diffusion.samplers`).
`sample_in_batches` gives every sample its own random stream, so a seed gives the same
images whatever the batch size. `forward_noise` and `ddim_invert` take a clean latent
the other way, to a timestep t (docs/MATH.md, §5).

A model is any callable ``model(z_t, t) -> v̂`` with ``z_t`` of shape (B, …) and ``t`` a
LongTensor of shape (B,). A self-conditioned one (an attribute ``self_conditioned`` that
is true, as `ldm_cli.models.unet.UNet` with ``self_condition``) is called
``model(z_t, t, ẑ0)`` with the clean-latent estimate of the step before, zeros at the
first step (Chen et al. 2023; docs/MATH.md, §3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from ldm_cli.common.device import is_self_conditioned, model_in_precision
from ldm_cli.diffusion import DEFAULT_STEPS
from ldm_cli.diffusion.parametrization import alpha_sigma, predict_z0_eps
from ldm_cli.diffusion.samplers import SAMPLERS, check_batch_size, check_sampler_args, sampling_timesteps
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.errors import UsageError

Model = Callable[[torch.Tensor, torch.LongTensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Generators = torch.Generator | Sequence[torch.Generator] | None

SEED_STRIDE = 1_000_003  # sample i of seed s uses the generator seeded s·SEED_STRIDE + i
NOISE_CHUNK_STEPS = 16  # per-sample generators draw the noise of this many steps at once ...
NOISE_CHUNK_ELEMENTS = 8192  # ... but at most this many numbers per sample (32 KiB in float32)


# --------------------------------------------------------------------------- noise


def predict_v(model: Model, z: torch.Tensor, t: int, z0_before: torch.Tensor | None) -> torch.Tensor:
    """v̂ = model(z_t, t) at one timestep for the whole batch, in z's dtype; a self-conditioned
    model also gets ``z0_before``, the estimate of z0 from the step before (None: zeros)."""
    t_batch = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
    if not is_self_conditioned(model):
        return model(z, t_batch).to(z.dtype)
    return model(z, t_batch, torch.zeros_like(z) if z0_before is None else z0_before).to(z.dtype)


def _per_sample_generators(generator: Generators) -> list[torch.Generator] | None:
    """A list of generators (one per sample), or None for one shared generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    return list(generator)


def draw_noise(
    shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """ε ~ N(0, I) of ``shape`` from ``generator``; a sequence of generators draws sample i from the i-th.

    Noise is drawn on the generator's device (CPU for a default ``torch.Generator()``)
    and moved to ``device``, so a seed gives the same numbers whatever the device.
    """
    shape = tuple(shape)
    generators = _per_sample_generators(generator)
    if generators is None:
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    out = torch.empty(shape, dtype=dtype, device=generators[0].device)
    for row, gen in zip(out, generators):
        torch.randn(shape[1:], generator=gen, dtype=dtype, device=gen.device, out=row)
    return out.to(device)


class StepNoise:
    """The per-step noise ε ~ N(0, I) of a sampling chain, one batch per `draw`.

    With one generator (or None) each draw is one ``randn`` of the whole batch. With
    one generator per sample, sample i draws its noise for the next ``chunk`` steps in
    one call, ``randn((chunk, *shape[1:]))`` from its own generator: its noise depends
    on its generator only, never on the batch it sits in, and the Python cost of a
    call per sample is paid once per chunk instead of once per step. ``chunk`` depends
    on the size of one sample only (buffer at most `NOISE_CHUNK_ELEMENTS` per sample).
    """

    def __init__(self, shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype):
        self.shape, self.generator, self.device, self.dtype = tuple(shape), generator, device, dtype
        self.generators = _per_sample_generators(generator)
        per_sample = math.prod(self.shape[1:])
        self.chunk = max(1, min(NOISE_CHUNK_STEPS, NOISE_CHUNK_ELEMENTS // max(per_sample, 1)))
        self.buffer: torch.Tensor | None = None  # (B, chunk, *shape[1:])
        self.index = 0

    def draw(self) -> torch.Tensor:
        if self.generators is None:
            return draw_noise(self.shape, self.generator, self.device, self.dtype)
        if self.buffer is None or self.index == self.chunk:
            batch, *rest = self.shape
            self.buffer = torch.empty((batch, self.chunk, *rest), dtype=self.dtype, device=self.generators[0].device)
            for row, gen in zip(self.buffer, self.generators):
                torch.randn((self.chunk, *rest), generator=gen, dtype=self.dtype, device=gen.device, out=row)
            self.index = 0
        noise = self.buffer[:, self.index]
        self.index += 1
        return noise.to(self.device)


def forward_noise(
    schedule: NoiseSchedule, z0: torch.Tensor, t: int, generator: Generators = None
) -> torch.Tensor:
    """``z_t = α_t·z0 + σ_t·ε`` with ε drawn from ``generator`` (Ho et al. 2020, eq. 4).

    Used by reimagine: noise an encoded image to ``t = round(strength·T) − 1``, then `sample`
    from there with ``z_start`` and ``t_start = t``.
    """
    if not 0 <= t < schedule.timesteps:
        raise UsageError(f"forward noising timestep must be in 0..{schedule.timesteps - 1}, got {t}")
    eps = draw_noise(z0.shape, generator, z0.device, z0.dtype)
    alpha, sigma = alpha_sigma(schedule, t, z0)
    return alpha * z0 + sigma * eps


# --------------------------------------------------------------------------- loops




def plan_timesteps(schedule: NoiseSchedule, sampler: str, steps: int | None, spacing: str, t_start: int) -> list[int]:
    """The descending timesteps a sampler visits from ``t_start``; the chain then goes to clean.

    DDPM visits every timestep t_start … 0; DDIM and DPM++ pick ``steps`` (default
    `DEFAULT_STEPS`, capped at t_start + 1) of 0 … t_start with `sampling_timesteps`.
    """
    if SAMPLERS[sampler].every_timestep:
        return list(range(t_start, -1, -1))
    if steps is None:
        steps = min(DEFAULT_STEPS, t_start + 1)
    return sampling_timesteps(t_start + 1, steps, spacing)


def start_latent(
    z_start: torch.Tensor, shape: tuple[int, ...], timesteps: list[int], t_start: int, spacing: str,
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """A latent already noised to ``t_start`` (reimagine), checked against the chain it starts."""
    if tuple(z_start.shape) != shape:
        raise UsageError(f"z_start has shape {tuple(z_start.shape)}, expected {shape}")
    if timesteps[0] != t_start:
        raise UsageError(
            f"{spacing!r} spacing starts at t={timesteps[0]}, not at t_start={t_start} where z_start is: "
            "use 'trailing' or 'linspace'"
        )
    return z_start.to(device=device, dtype=dtype)


def sample(
    model: Model,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    clip_limit: float | None = None,
    spacing: str = "trailing",
    generator: Generators = None,
    z_start: torch.Tensor | None = None,
    t_start: int | None = None,
    callback: Callback | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
) -> torch.Tensor:
    """Run the reverse chain and return the clean latents, shape ``shape``.

    The chain starts from pure noise ε ~ N(0, I) at ``t_start`` (default T−1), or from
    ``z_start``, a latent already noised to ``t_start`` (reimagine; see `forward_noise`),
    and visits the timesteps of `plan_timesteps` down to the clean latent. ``eta`` is
    DDIM's η. ``generator`` is one ``torch.Generator`` for the whole batch or one per
    sample (then every sample's draws depend on its own generator only, see
    `sample_in_batches`). ``callback(i, t, z, ẑ0)`` runs after step i, which evaluated
    the model at timestep t and produced z. The model runs once per step; with
    ``precision="bf16"`` it runs in bfloat16 (`common.device.model_in_precision`) while the
    sampler's own arithmetic stays in ``dtype``.
    """
    t_start = schedule.timesteps - 1 if t_start is None else t_start
    check_sampler_args(sampler, steps, eta, clip_limit, spacing, schedule.timesteps, t_start)
    spec = SAMPLERS[sampler]
    timesteps = plan_timesteps(schedule, sampler, steps, spacing, t_start)
    shape = tuple(shape)
    device = torch.device(device if device is not None else (z_start.device if z_start is not None else "cpu"))
    if z_start is None:
        z = draw_noise(shape, generator, device, dtype)
    else:
        z = start_latent(z_start, shape, timesteps, t_start, spacing, device, dtype)
    noise = StepNoise(shape, generator, device, dtype)
    previous: tuple[int, torch.Tensor] | None = None  # (t, ẑ0) of the step before, for multistep samplers
    v_model = model_in_precision(model, precision)
    with torch.inference_mode():
        for i, (t, t_next) in enumerate(zip(timesteps, timesteps[1:] + [-1])):
            v_hat = predict_v(v_model, z, t, previous[1] if previous is not None else None)
            step_noise = noise.draw() if spec.is_stochastic(eta) and t_next >= 0 else None
            options = spec.options(eta, step_noise, previous)
            z, z0_hat = spec.step(schedule, z, t, t_next, v_hat, clip_limit=clip_limit, **options)
            previous = (t, z0_hat)
            if callback is not None:
                callback(i, t, z, z0_hat)
    return z


def sample_in_batches(
    model: Model,
    schedule: NoiseSchedule,
    num_samples: int,
    shape_per_sample: Sequence[int],
    batch_size: int,
    seed: int,
    **kwargs,
) -> Iterator[torch.Tensor]:
    """Yield ``num_samples`` samples in batches of at most ``batch_size``.

    Sample i draws all its noise from its own generator, seeded ``seed·1_000_003 + i``,
    so sample i is the same whatever the batch size (up to the model's own rounding, which
    in bf16 can differ between batch sizes), and only one batch is held in memory at a
    time. ``kwargs`` go to `sample`.
    """
    check_batch_size(batch_size)
    model = model_in_precision(model, kwargs.get("precision", "fp32"))  # once, not for every batch
    for first in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - first)
        generators = [torch.Generator().manual_seed(seed * SEED_STRIDE + i) for i in range(first, first + count)]
        yield sample(model, schedule, (count, *shape_per_sample), generator=generators, **kwargs)


def ddim_invert(
    model: Model,
    schedule: NoiseSchedule,
    z0: torch.Tensor,
    steps: int,
    spacing: str = "trailing",
    fixed_point_iters: int = 2,
    t_start: int | None = None,
) -> torch.Tensor:
    """Deterministic DDIM encoding (η = 0) of clean latents z0, run forward in time up to
    ``t_start`` (default T−1) — the chain `sample(..., t_start=t_start)` runs back down.

    Returns the latent at the first timestep of `sampling_timesteps(t_start + 1, steps, spacing)`,
    from which `sample(..., sampler='ddim', steps=steps, spacing=spacing, z_start=…)`
    decodes z0 again — with 'trailing' or 'linspace' spacing, whose chains start at
    T−1; a 'leading' chain starts below T−1, where `sample` cannot start it.

    With α = √ᾱ = cos φ and σ = √(1−ᾱ) = sin φ, the DDIM η=0 step (Song et al. 2021,
    eq. 12) written with v̂ is a rotation (Salimans & Ho 2022, App. D):

        z_s = √ᾱ_s·ẑ0 + √(1−ᾱ_s)·ε̂ = cos(φ_s − φ_t)·z_t + sin(φ_s − φ_t)·v̂(z_t, t)

    Each step from t (clean: φ = 0) up to the next sampling timestep n inverts it:

        z_n = (z_t − sin(φ_t − φ_n)·v̂(z_n, n)) / cos(φ_t − φ_n)

    The classic inversion (``fixed_point_iters = 0``) evaluates v̂ at z_t instead of
    z_n, an O(1/steps) error. Each fixed-point iteration re-evaluates v̂ at the new
    z_n; for a model whose v̂ changes about as fast as its input the map contracts by
    about tan|φ_t − φ_n|, so two iterations bring the round trip to about 1e-5 at 100
    steps (1.6e-5 measured on the Gaussian oracle). Model calls: steps·(1 + iterations).

    A self-conditioned model gets the z0 estimate of the step below (z0 itself at the
    first step), ẑ0 = cos φ_n·z_n − sin φ_n·v̂ with the last iterate z_n and the v̂ that
    produced it (the same iterate once the iteration has converged); the chain down feeds
    the one of the step above instead, so for such a model the round trip holds only as
    far as the two agree.
    """
    t_start = schedule.timesteps - 1 if t_start is None else t_start
    if not 0 <= t_start < schedule.timesteps:
        raise UsageError(f"t_start {t_start}: must be in 0..{schedule.timesteps - 1}")
    timesteps = sampling_timesteps(t_start + 1, steps, spacing)[::-1]
    z = z0
    phi_t = 0.0  # the clean latent: ᾱ = 1
    z0_estimate = z0  # what a self-conditioned model is given
    with torch.inference_mode():
        for t_next in timesteps:
            alpha_bar_next = schedule.alpha_bar_at(t_next)
            phi_next = math.atan2(math.sqrt(1.0 - alpha_bar_next), math.sqrt(alpha_bar_next))
            sin_d, cos_d = math.sin(phi_t - phi_next), math.cos(phi_t - phi_next)
            z_next = z
            for _ in range(1 + fixed_point_iters):
                v_hat = predict_v(model, z_next, t_next, z0_estimate)
                z_next = (z - sin_d * v_hat) / cos_d
            z0_estimate = predict_z0_eps(schedule, z_next, t_next, v_hat)[0]
            z, phi_t = z_next, phi_next
    return z
