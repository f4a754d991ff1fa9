"""Noise schedules and the v-parametrization: closed forms, validation, and the z0 / ε / v
identities of docs/MATH.md, §1–2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ldm_cli.config import DiffusionConfig
from ldm_cli.diffusion.parametrization import predict_z0_eps, v_target
from ldm_cli.diffusion.schedules import NoiseSchedule, linear_schedule_warning
from ldm_cli.errors import UsageError


def cosine_f(t: int, T: int, s: float = 0.008) -> float:
    """Nichol & Dhariwal 2021, eq. 17, computed independently of the module."""
    return math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2


def sigmoid_gamma(tau: float, start: float = -3.0, end: float = 3.0, temp: float = 1.0) -> float:
    """Chen 2023, Algorithm 1 (without clip_min)."""

    def sig(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    v_start, v_end = sig(start / temp), sig(end / temp)
    return (v_end - sig((tau * (end - start) + start) / temp)) / (v_end - v_start)


# --------------------------------------------------------------------------- cosine


@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_cosine_matches_closed_form(T: int) -> None:
    sched = NoiseSchedule.create("cosine", T)
    f0 = cosine_f(0, T)
    betas, alpha_bar = sched.betas.tolist(), sched.alphas_cumprod.tolist()
    for t in range(T - 1):  # the β clip only bites at the last index
        assert alpha_bar[t] == pytest.approx(cosine_f(t + 1, T) / f0, abs=1e-12, rel=0)
        assert betas[t] == pytest.approx(1 - cosine_f(t + 1, T) / cosine_f(t, T), abs=1e-12, rel=0)
    # ᾱ(T) = cos²(π/2) = 0 would give β = 1: clipped at 0.999
    assert betas[T - 1] == 0.999
    previous = cosine_f(T - 1, T) / f0  # ᾱ(0)=1 normalisation: code index 0 holds f(1)/f(0)
    assert alpha_bar[T - 1] == pytest.approx(previous * (1 - 0.999), abs=1e-12, rel=1e-9)


def test_cosine_is_a_valid_schedule() -> None:
    sched = NoiseSchedule.create("cosine", 1000)
    assert sched.alphas_cumprod.dtype == torch.float64
    assert torch.all(sched.betas > 0) and torch.all(sched.betas <= 0.999)
    assert torch.all(sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1])
    assert torch.allclose(sched.alphas, 1 - sched.betas, atol=0, rtol=0)
    assert torch.allclose(sched.alphas_cumprod, torch.cumprod(sched.alphas, 0), atol=0, rtol=0)
    assert sched.alpha_bar_at(-1) == 1.0
    assert sched.alpha_bar_at(999) < 1e-8


# --------------------------------------------------------------------------- linear, sigmoid


def test_linear_betas_run_evenly_from_beta_start_to_beta_end() -> None:
    sched = NoiseSchedule.create("linear", 1000, beta_start=1e-4, beta_end=0.02)
    betas = sched.betas
    assert betas[0].item() == 1e-4 and betas[-1].item() == 0.02
    steps = betas[1:] - betas[:-1]
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), atol=1e-15, rtol=0)
    assert sched.alpha_bar_at(999) == pytest.approx(math.prod(1 - b for b in betas.tolist()), rel=1e-12)


def test_sigmoid_is_monotone_and_matches_chen() -> None:
    T = 1000
    sched = NoiseSchedule.create("sigmoid", T)
    assert torch.all(sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1])
    assert torch.all(sched.betas > 0) and torch.all(sched.betas <= 0.999)
    for t in (0, 1, 250, 500, 998):
        assert sched.alpha_bar_at(t) == pytest.approx(sigmoid_gamma((t + 1) / T), abs=1e-12, rel=0)
    assert sched.betas[-1].item() == 0.999


def test_short_linear_schedule_warns_and_cosine_does_not() -> None:
    linear = NoiseSchedule.create("linear", 10)
    assert linear.alpha_bar_at(9) == pytest.approx(0.904, abs=0.01)
    warning = linear_schedule_warning(linear)
    assert warning is not None and "\n" not in warning and "0.90" in warning
    assert linear_schedule_warning(NoiseSchedule.create("cosine", 10)) is None
    assert linear_schedule_warning(NoiseSchedule.create("linear", 1000)) is None
    assert linear_schedule_warning(NoiseSchedule.create("sigmoid", 10)) is None


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_v_target_and_predict_z0_eps_invert_each_other_in_float64_and_float32(kind: str, dtype: torch.dtype, tol: float) -> None:
    sched = NoiseSchedule.create(kind, 1000)
    gen = torch.Generator().manual_seed(0)
    z0 = 2 * torch.randn(64, 4, 3, 3, generator=gen, dtype=dtype)
    eps = torch.randn(64, 4, 3, 3, generator=gen, dtype=dtype)
    t = torch.randint(0, 1000, (64,), generator=gen)
    t[:3] = torch.tensor([0, 1, 999])

    z_t = sched.add_noise(z0, t, eps)
    v = v_target(sched, z0, t, eps)
    assert z_t.dtype == dtype and v.dtype == dtype
    z0_back, eps_back = predict_z0_eps(sched, z_t, t, v)
    assert (z0_back - z0).abs().max() < tol
    assert (eps_back - eps).abs().max() < tol
    # the same relations, written out with ᾱ looked up independently of the schedule's gather
    ab = torch.tensor([sched.alpha_bar_at(int(i)) for i in t], dtype=dtype).view(-1, 1, 1, 1)
    assert torch.allclose(z_t, ab.sqrt() * z0 + (1 - ab).sqrt() * eps, atol=tol, rtol=0)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * z0, atol=tol, rtol=0)
    if dtype == torch.float64:  # dividing by √(1−ᾱ_0) ≈ 0.006 (cosine) amplifies float32 rounding
        big = 10.0 * z0.abs().max().item()  # a clip limit that clips nothing takes the ε = (z_t − α·z0)/σ path
        assert (predict_z0_eps(sched, z_t, t, v, clip_limit=big)[1] - eps).abs().max() < tol
    # an integer timestep (the samplers' scalar path) gives the same as a tensor of it
    z0_int, eps_int = predict_z0_eps(sched, z_t[:1], int(t[0]), v[:1])
    assert torch.allclose(z0_int, z0_back[:1], atol=tol, rtol=0)
    assert torch.allclose(eps_int, eps_back[:1], atol=tol, rtol=0)


def test_scalings_broadcast_per_sample_treat_t_minus_1_as_clean_and_snr_falls() -> None:
    sched = NoiseSchedule.create("cosine", 100)
    like = torch.zeros(3, 4, 5, 5, dtype=torch.float32)
    t = torch.tensor([-1, 0, 99])
    alpha, sigma = sched.scalings(t, like)
    assert alpha.shape == (3, 1, 1, 1) and alpha.dtype == torch.float32 and sigma.shape == (3, 1, 1, 1)
    assert alpha[0].item() == 1.0 and sigma[0].item() == 0.0
    assert alpha[1].item() ** 2 == pytest.approx(sched.alpha_bar_at(0), rel=1e-6)
    assert sigma[2].item() ** 2 == pytest.approx(1 - sched.alpha_bar_at(99), rel=1e-6)
    snr = sched.snr(torch.arange(100))
    assert snr.dtype == torch.float64 and torch.all(snr[1:] < snr[:-1])
    assert snr[5].item() == pytest.approx(sched.alpha_bar_at(5) / (1 - sched.alpha_bar_at(5)), rel=1e-12)


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_schedule_rebuilds_identically_from_json_or_string_metadata(kind: str) -> None:
    sched = NoiseSchedule.create(kind, 123, beta_start=2e-4, beta_end=0.03)
    meta = json.loads(json.dumps(sched.to_metadata()))
    as_strings = {key: str(value) for key, value in meta.items()}  # safetensors metadata is str → str
    for rebuilt in (NoiseSchedule.from_metadata(meta), NoiseSchedule.from_metadata(as_strings)):
        assert rebuilt.kind == kind and rebuilt.timesteps == 123
        assert torch.equal(rebuilt.betas, sched.betas)
        assert torch.equal(rebuilt.alphas_cumprod, sched.alphas_cumprod)


def test_schedule_from_config_tabulates_beta_and_alpha_bar_per_step() -> None:
    sched = NoiseSchedule.from_config(DiffusionConfig(schedule="linear", timesteps=20, beta_start=1e-3, beta_end=0.1))
    assert (sched.kind, sched.timesteps) == ("linear", 20)
    rows = sched.table()
    assert len(rows) == 20 and rows[0][0] == 0 and rows[-1][0] == 19
    assert rows[0][1] == pytest.approx(1e-3) and rows[-1][2] == pytest.approx(sched.alpha_bar_at(19))


@pytest.mark.parametrize(
    ("kind", "T", "match"),
    [("quadratic", 100, "unknown noise schedule 'quadratic'"), ("cosine", 0, "timesteps"), ("linear", -3, "timesteps")],
)
def test_bad_schedules_are_usage_errors(kind: str, T: int, match: str) -> None:
    with pytest.raises(UsageError, match=match) as info:
        NoiseSchedule.create(kind, T)
    assert "\n" not in str(info.value)


def test_bad_metadata_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="timesteps"):
        NoiseSchedule.from_metadata({"kind": "cosine", "beta_start": 1e-4, "beta_end": 0.02})
