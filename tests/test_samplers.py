"""Samplers: hand-computed steps, an exact Gaussian / mixture oracle, inversion, seeding.

The oracle tests (docs/ARCHITECTURE.md, "How behaviour is tested"): for Gaussian data, or a
mixture of Gaussians, the optimal denoiser is known in closed form, so a sampler
driven by it must reproduce the data distribution — up to its own discretisation
error, which for DDIM and DPM-Solver++ on Gaussian data is computed exactly here
(their steps are affine in z, so the whole chain is z0 = A·z_start + B per dimension).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from ldm_cli.diffusion.parametrization import predict_z0_eps
from ldm_cli.diffusion.samplers import ddim_step, ddpm_step, dpm_solver_pp_2m_step, sampling_timesteps
from ldm_cli.diffusion.sampling import ddim_invert, forward_noise, sample, sample_in_batches
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.errors import UsageError


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The oracle runs thousands of small elementwise ops: threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- oracles


class GaussianOracle:
    """Optimal v̂ for data z0 ~ N(m, diag(s²)) over the last dimension.

    z_t | z0 ~ N(√ᾱ z0, (1−ᾱ) I), so E[z0 | z_t] = m + √ᾱ s²/(ᾱ s² + 1−ᾱ)·(z_t − √ᾱ m),
    and from z0 = √ᾱ z_t − √(1−ᾱ) v:  v̂ = (√ᾱ z_t − ẑ0)/√(1−ᾱ).
    The samplers call the model with one timestep for the whole batch.
    """

    def __init__(self, schedule: NoiseSchedule, m: list[float], s: list[float]):
        self.schedule = schedule
        self.m = torch.tensor(m, dtype=torch.float64)
        self.s2 = torch.tensor(s, dtype=torch.float64) ** 2

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.schedule.alpha_bar_at(int(t[0]))
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        m, s2 = self.m.to(z.dtype), self.s2.to(z.dtype)
        z0_hat = m + (a * s2 / (ab * s2 + 1 - ab)) * (z - a * m)
        return (a * z - z0_hat) / b


class MixtureOracle:
    """Optimal v̂ for 1-D data z0 ~ Σ_k w_k N(m_k, s_k²); z has shape (N, 1).

    z_t | k ~ N(√ᾱ m_k, ᾱ s_k² + 1−ᾱ) gives the responsibilities r_k(z_t) by Bayes, and
    E[z0 | z_t] = Σ_k r_k·(m_k + √ᾱ s_k²/(ᾱ s_k² + 1−ᾱ)·(z_t − √ᾱ m_k)).
    """

    def __init__(self, schedule: NoiseSchedule, w: list[float], m: list[float], s: list[float]):
        self.schedule = schedule
        self.log_w = torch.tensor(w, dtype=torch.float64).log()
        self.m = torch.tensor(m, dtype=torch.float64)
        self.s2 = torch.tensor(s, dtype=torch.float64) ** 2

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.schedule.alpha_bar_at(int(t[0]))
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        var = ab * self.s2 + (1 - ab)  # (K,)
        diff = z - a * self.m.to(z.dtype)  # (N, K)
        log_p = (self.log_w - 0.5 * var.log()).to(z.dtype) - 0.5 * diff.square() / var.to(z.dtype)
        resp = torch.softmax(log_p, dim=1)
        posterior_means = self.m.to(z.dtype) + (a * self.s2 / var).to(z.dtype) * diff
        z0_hat = (resp * posterior_means).sum(dim=1, keepdim=True)
        return (a * z - z0_hat) / b


def exact_affine_map(
    schedule: NoiseSchedule, timesteps: list[int], m: float, s: float, solver: str
) -> tuple[float, float]:
    """(A, B) such that DDIM(η=0) / DPM-Solver++(2M) with the Gaussian oracle maps z_start to A·z_start + B.

    Plain-float transcription of docs/MATH.md's DDIM formula (§4.2) and Lu et al. 2022's 2M update
    (first order when there is no previous step or h_last/h < 1/2).
    """
    A, B = 1.0, 0.0  # the current latent, as A·z_start + B
    last: tuple[float, float, float] | None = None  # (λ, A0, B0) of the previous step
    for t, t_next in zip(timesteps, timesteps[1:] + [-1]):
        ab, ab_next = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_next)
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        gain = a * s * s / (ab * s * s + 1 - ab)
        A0, B0 = gain * A, m + gain * (B - a * m)  # ẑ0
        Ae, Be = (A - a * A0) / b, (B - a * B0) / b  # ε̂ = (z_t − √ᾱ ẑ0)/√(1−ᾱ)
        if solver == "ddim":
            A = math.sqrt(ab_next) * A0 + math.sqrt(1 - ab_next) * Ae
            B = math.sqrt(ab_next) * B0 + math.sqrt(1 - ab_next) * Be
            continue
        lam = 0.5 * math.log(ab / (1 - ab))
        if t_next == -1:
            A, B = A0, B0
        else:
            h = 0.5 * math.log(ab_next / (1 - ab_next)) - lam
            DA, DB = A0, B0
            r = 0.0 if last is None else (lam - last[0]) / h
            if r >= 0.5:  # second order unless this step is over twice as long in λ
                DA = (1 + 1 / (2 * r)) * A0 - last[1] / (2 * r)
                DB = (1 + 1 / (2 * r)) * B0 - last[2] / (2 * r)
            ratio, coef = math.sqrt((1 - ab_next) / (1 - ab)), math.sqrt(ab_next) * math.expm1(-h)
            A, B = ratio * A - coef * DA, ratio * B - coef * DB
        last = (lam, A0, B0)
    return A, B


# --------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize(
    ("T", "steps"), [(1000, 1), (1000, 20), (1000, 50), (1000, 999), (1000, 1000), (10, 3), (7, 7)]
)
def test_sampling_timesteps_are_descending_unique_in_range(spacing: str, T: int, steps: int) -> None:
    ts = sampling_timesteps(T, steps, spacing)
    assert len(ts) == steps and len(set(ts)) == steps
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert all(0 <= t < T for t in ts)
    if spacing in ("trailing", "linspace"):
        assert ts[0] == T - 1
    if spacing == "leading" or (spacing == "linspace" and steps > 1):
        assert ts[-1] == 0


def test_sampling_timesteps_match_worked_examples_per_spacing() -> None:
    assert sampling_timesteps(1000, 50) == list(range(999, 0, -20))
    assert sampling_timesteps(10, 4, "trailing") == [9, 7, 4, 2]
    assert sampling_timesteps(10, 4, "leading") == [6, 4, 2, 0]
    assert sampling_timesteps(10, 5, "linspace") == [9, 7, 5, 2, 0]  # strides 2, 2, 3, 2


@pytest.mark.parametrize(("steps", "spacing"), [(1001, "trailing"), (0, "linspace"), (5000, "leading")])
def test_sampling_timesteps_rejects_bad_counts(steps: int, spacing: str) -> None:
    with pytest.raises(UsageError, match=rf"--steps {steps}: must be between 1 and the model's T = 1000"):
        sampling_timesteps(1000, steps, spacing)


def test_unknown_spacing_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="spacing 'uniform'"):
        sampling_timesteps(1000, 10, "uniform")


# --------------------------------------------------------------------------- single steps by hand

# T = 4 linear schedule, β = 0.1, 0.2, 0.3, 0.4: ᾱ = 0.9, 0.72, 0.504, 0.3024
TINY_ALPHA_BAR = {-1: 1.0, 0: 0.9, 1: 0.9 * 0.8, 2: 0.9 * 0.8 * 0.7, 3: 0.9 * 0.8 * 0.7 * 0.6}
Z_T = [0.7, -1.3, 0.2]
V_HAT = [0.4, 0.1, -2.0]
NOISE = [0.5, -0.25, 1.5]


def tiny_schedule() -> NoiseSchedule:
    return NoiseSchedule.create("linear", 4, beta_start=0.1, beta_end=0.4)


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def z0_eps_by_hand(z: float, v: float, ab: float) -> tuple[float, float]:
    return math.sqrt(ab) * z - math.sqrt(1 - ab) * v, math.sqrt(1 - ab) * z + math.sqrt(ab) * v


@pytest.mark.parametrize(("t", "t_prev"), [(3, 2), (3, 1), (2, 0), (1, -1), (0, -1)])
def test_ddpm_step_matches_hand_computation(t: int, t_prev: int) -> None:
    ab, ab_prev = TINY_ALPHA_BAR[t], TINY_ALPHA_BAR[t_prev]
    beta = 1 - ab / ab_prev  # the strided chain's own β
    alpha = 1 - beta
    sigma = math.sqrt(beta * (1 - ab_prev) / (1 - ab))
    expected, expected_z0 = [], []
    for z, v, n in zip(Z_T, V_HAT, NOISE):
        z0, eps = z0_eps_by_hand(z, v, ab)
        mean = (z - beta / math.sqrt(1 - ab) * eps) / math.sqrt(alpha)
        expected.append(mean + (sigma * n if t_prev >= 0 else 0.0))
        expected_z0.append(z0)

    noise = f64(NOISE) if t_prev >= 0 else None
    z_prev, z0_hat = ddpm_step(tiny_schedule(), f64(Z_T), t, t_prev, f64(V_HAT), noise=noise)
    assert z_prev.tolist() == pytest.approx(expected, abs=1e-12)
    assert z0_hat.tolist() == pytest.approx(expected_z0, abs=1e-12)
    if t_prev == -1:  # the last step lands on the posterior mean, which is ẑ0
        assert z_prev.tolist() == pytest.approx(expected_z0, abs=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("t", "t_next"), [(3, 1), (2, 1), (1, -1)])
def test_ddim_step_matches_hand_computation(eta: float, t: int, t_next: int) -> None:
    ab, ab_next = TINY_ALPHA_BAR[t], TINY_ALPHA_BAR[t_next]
    sigma = eta * math.sqrt((1 - ab_next) / (1 - ab)) * math.sqrt(1 - ab / ab_next)
    expected = []
    for z, v, n in zip(Z_T, V_HAT, NOISE):
        z0, eps = z0_eps_by_hand(z, v, ab)
        expected.append(math.sqrt(ab_next) * z0 + math.sqrt(max(1 - ab_next - sigma**2, 0.0)) * eps + sigma * n)

    z_next, _ = ddim_step(tiny_schedule(), f64(Z_T), t, t_next, f64(V_HAT), eta=eta, noise=f64(NOISE))
    assert z_next.tolist() == pytest.approx(expected, abs=1e-12)


def test_ddim_with_eta_one_is_the_ddpm_posterior() -> None:
    sched = tiny_schedule()
    ddim, _ = ddim_step(sched, f64(Z_T), 3, 1, f64(V_HAT), eta=1.0, noise=f64(NOISE))
    ddpm, _ = ddpm_step(sched, f64(Z_T), 3, 1, f64(V_HAT), noise=f64(NOISE))
    assert torch.allclose(ddim, ddpm, atol=1e-12, rtol=0)


def test_dpm_solver_pp_2m_step_matches_hand_computation_and_starts_as_ddim() -> None:
    sched = tiny_schedule()
    z0_last = f64([0.1, -0.2, 0.3])
    lam = {t: 0.5 * math.log(ab / (1 - ab)) for t, ab in TINY_ALPHA_BAR.items() if t >= 0}
    ab, ab_next = TINY_ALPHA_BAR[2], TINY_ALPHA_BAR[1]
    h, r = lam[1] - lam[2], (lam[2] - lam[3]) / (lam[1] - lam[2])
    expected = []
    for z, v, z0_prev in zip(Z_T, V_HAT, z0_last.tolist()):
        z0, _ = z0_eps_by_hand(z, v, ab)
        d = (1 + 1 / (2 * r)) * z0 - z0_prev / (2 * r)
        expected.append(math.sqrt((1 - ab_next) / (1 - ab)) * z - math.sqrt(ab_next) * (math.exp(-h) - 1) * d)
    second, _ = dpm_solver_pp_2m_step(sched, f64(Z_T), 2, 1, f64(V_HAT), previous=(3, z0_last))
    assert second.tolist() == pytest.approx(expected, abs=1e-12)

    first, _ = dpm_solver_pp_2m_step(sched, f64(Z_T), 2, 1, f64(V_HAT))
    ddim, _ = ddim_step(sched, f64(Z_T), 2, 1, f64(V_HAT))
    assert torch.allclose(first, ddim, atol=1e-12, rtol=0)  # first order = DDIM η=0

    final, z0_hat = dpm_solver_pp_2m_step(sched, f64(Z_T), 0, -1, f64(V_HAT), previous=(1, z0_last))
    assert torch.equal(final, z0_hat)


def test_dpm_solver_pp_2m_is_first_order_after_a_much_shorter_step() -> None:
    sched = NoiseSchedule.create("cosine", 1000)  # λ: 1.71 at t=106, 2.34 at 53, 5.1 at 0
    z_t, v_hat = f64(Z_T), f64(V_HAT)
    step, _ = dpm_solver_pp_2m_step(sched, z_t, 53, 0, v_hat, previous=(106, f64([0.1, -0.2, 0.3])))
    ddim, _ = ddim_step(sched, z_t, 53, 0, v_hat)
    assert torch.allclose(step, ddim, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- clip_limit


def test_clip_limit_clamps_z0_and_recomputes_eps() -> None:
    sched = NoiseSchedule.create("cosine", 100)
    gen = torch.Generator().manual_seed(0)
    z_t = 3 * torch.randn(256, generator=gen, dtype=torch.float64)
    v_hat = 3 * torch.randn(256, generator=gen, dtype=torch.float64)
    for t in (0, 40, 99):
        unclipped, _ = predict_z0_eps(sched, z_t, t, v_hat, None)
        z0_hat, eps_hat = predict_z0_eps(sched, z_t, t, v_hat, 1.5)
        assert unclipped.abs().max() > 1.5  # the clip is exercised
        assert z0_hat.abs().max() <= 1.5
        assert torch.equal(z0_hat, unclipped.clamp(-1.5, 1.5))
        ab = sched.alpha_bar_at(t)
        rebuilt = math.sqrt(ab) * z0_hat + math.sqrt(1 - ab) * eps_hat
        assert (rebuilt - z_t).abs().max() < 1e-12

    _, z0_from_ddim = ddim_step(sched, z_t, 40, 20, v_hat, clip_limit=1.5)
    assert z0_from_ddim.abs().max() <= 1.5


def test_ddpm_with_clip_limit_ends_inside_the_limit() -> None:
    sched = NoiseSchedule.create("cosine", 50)
    oracle = GaussianOracle(sched, [0.0], [3.0])  # data far outside the limit
    out = sample(oracle, sched, (500, 1), sampler="ddpm", clip_limit=1.0, generator=torch.Generator().manual_seed(0))
    assert out.abs().max() <= 1.0 + 1e-6


# --------------------------------------------------------------------------- exact oracle

GAUSS_M, GAUSS_S = [0.5, -1.0], [0.5, 2.0]  # two independent dimensions, narrow and wide


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_ddpm_reproduces_gaussian_data(kind: str) -> None:
    sched = NoiseSchedule.create(kind, 1000)
    oracle = GaussianOracle(sched, GAUSS_M, GAUSS_S)
    out = sample(oracle, sched, (20_000, 2), sampler="ddpm", generator=torch.Generator().manual_seed(0))
    m, s = torch.tensor(GAUSS_M), torch.tensor(GAUSS_S)
    # measured: |mean error| <= 0.013·s, variance within 1.5% (Monte Carlo s.e. 1%)
    assert ((out.mean(0) - m).abs() / s).max() < 0.03
    assert (out.var(0) / s**2 - 1).abs().max() < 0.04


# |A²/s² − 1|, the exact variance error of each solver with the oracle; measured worst
# case over cosine/linear, trailing/linspace: DDIM-20 0.259, DDIM-50 0.111, DPM++2M-20 0.092
VARIANCE_SHRINK_BOUND = {("ddim", 20): 0.27, ("ddim", 50): 0.12, ("dpm++2m", 20): 0.10}


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize(
    ("solver", "steps", "spacing"),
    [
        ("ddim", 20, "trailing"),
        ("ddim", 50, "trailing"),
        ("ddim", 20, "linspace"),
        ("dpm++2m", 20, "trailing"),
        ("dpm++2m", 20, "linspace"),
    ],
)
def test_deterministic_samplers_follow_the_exact_map(kind: str, solver: str, steps: int, spacing: str) -> None:
    sched = NoiseSchedule.create(kind, 1000)
    oracle = GaussianOracle(sched, GAUSS_M, GAUSS_S)
    z_start = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sample(
        oracle, sched, z_start.shape, sampler=solver, steps=steps, spacing=spacing, z_start=z_start, dtype=torch.float64
    )

    timesteps = sampling_timesteps(1000, steps, spacing)
    for d, (m, s) in enumerate(zip(GAUSS_M, GAUSS_S)):
        A, B = exact_affine_map(sched, timesteps, m, s, solver)
        assert (out[:, d] - (A * z_start[:, d] + B)).abs().max() < 1e-9
        # the data-level view: means are right; variance shrinks by the solver's own
        # discretisation error (exactly B - m and A² - s², checked against the data here)
        assert abs(out[:, d].mean().item() - m) < 0.03 * s
        assert abs(A * A / (s * s) - 1) < VARIANCE_SHRINK_BOUND[(solver, steps)]
        assert abs(B - m) < 0.01 * s


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_dpm_solver_20_steps_beats_ddim_50_steps(kind: str, spacing: str) -> None:
    sched = NoiseSchedule.create(kind, 1000)
    for m, s in zip(GAUSS_M, GAUSS_S):
        A_dpm, _ = exact_affine_map(sched, sampling_timesteps(1000, 20, spacing), m, s, "dpm++2m")
        A_ddim, _ = exact_affine_map(sched, sampling_timesteps(1000, 50, spacing), m, s, "ddim")
        assert abs(A_dpm**2 / s**2 - 1) < abs(A_ddim**2 / s**2 - 1)


MIX_W, MIX_M, MIX_S = [0.2, 0.5, 0.3], [-2.0, 0.0, 2.0], [0.25, 0.25, 0.25]


@pytest.mark.parametrize(("solver", "steps"), [("ddpm", None), ("ddim", 50), ("dpm++2m", 20)])
def test_samplers_reproduce_mixture_weights(solver: str, steps: int | None) -> None:
    sched = NoiseSchedule.create("cosine", 1000)
    oracle = MixtureOracle(sched, MIX_W, MIX_M, MIX_S)
    out = sample(oracle, sched, (10_000, 1), sampler=solver, steps=steps, generator=torch.Generator().manual_seed(1))
    nearest = (out - torch.tensor(MIX_M)).abs().argmin(dim=1)
    fractions = torch.bincount(nearest, minlength=3).double() / len(out)
    # measured: within 0.009 of the weights (s.e. 0.005); components overlap < 1e-4
    assert (fractions - torch.tensor(MIX_W, dtype=torch.float64)).abs().max() < 0.03
    if solver == "ddpm":
        for k, (m, s) in enumerate(zip(MIX_M, MIX_S)):
            member = out[nearest == k, 0]
            assert abs(member.mean().item() - m) < 0.03 * s
            assert abs(member.std().item() / s - 1) < 0.05


# --------------------------------------------------------------------------- inversion


@pytest.mark.parametrize(("kind", "spacing"), [("cosine", "trailing"), ("linear", "linspace")])
def test_ddim_inversion_round_trips_and_fixed_point_iterations_tighten_it(kind: str, spacing: str) -> None:
    sched = NoiseSchedule.create(kind, 1000)
    oracle = GaussianOracle(sched, GAUSS_M, GAUSS_S)
    gen = torch.Generator().manual_seed(3)
    z0 = torch.tensor(GAUSS_M, dtype=torch.float64) + torch.tensor(GAUSS_S, dtype=torch.float64) * torch.randn(
        2000, 2, generator=gen, dtype=torch.float64
    )

    def round_trip(iters: int) -> float:
        z_T = ddim_invert(oracle, sched, z0, steps=100, spacing=spacing, fixed_point_iters=iters)
        back = sample(
            oracle, sched, z0.shape, sampler="ddim", steps=100, spacing=spacing, z_start=z_T, dtype=torch.float64
        )
        return (back - z0).abs().max().item()

    # measured at 100 steps: classic 0.057 (cosine) / 0.078 (linear); 2 iterations ≤ 1.6e-5
    assert round_trip(0) < 0.1
    assert round_trip(2) < 1e-4


# --------------------------------------------------------------------------- the loop


class Recorder:
    """A model that records its calls and predicts v̂ = 0."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.clone())
        return torch.zeros_like(z)


def test_model_is_called_once_per_listed_timestep() -> None:
    sched = NoiseSchedule.create("cosine", 1000)
    model = Recorder()
    steps: list[tuple[int, int]] = []
    record = lambda i, t, z, z0: steps.append((i, t))  # noqa: E731
    sample(model, sched, (3, 2), sampler="ddim", steps=20, spacing="linspace", callback=record)
    listed = sampling_timesteps(1000, 20, "linspace")
    assert len(model.calls) == 20
    for t_batch, t in zip(model.calls, listed):
        assert t_batch.dtype == torch.long and t_batch.shape == (3,) and torch.all(t_batch == t)
    assert steps == list(enumerate(listed))


def test_ddim_next_timestep_comes_from_the_list() -> None:
    sched = NoiseSchedule.create("linear", 1000)
    oracle = GaussianOracle(sched, GAUSS_M, GAUSS_S)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(oracle, sched, z.shape, sampler="ddim", steps=7, spacing="linspace", z_start=z, dtype=torch.float64)
    listed = sampling_timesteps(1000, 7, "linspace")  # strides 166 and 167
    for t, t_next in zip(listed, listed[1:] + [-1]):
        z, _ = ddim_step(sched, z, t, t_next, oracle(z, torch.full((16,), t)))
    assert torch.equal(out, z)


def test_default_steps_are_capped_and_ddpm_uses_every_step() -> None:
    sched = NoiseSchedule.create("cosine", 20)
    model = Recorder()
    sample(model, sched, (2, 1), sampler="ddim")
    assert len(model.calls) == 20  # default 50, capped at T
    model = Recorder()
    gen = torch.Generator().manual_seed(0)
    sample(model, sched, (2, 1), sampler="ddpm", t_start=7, z_start=torch.zeros(2, 1), generator=gen)
    assert [int(t[0]) for t in model.calls] == list(range(7, -1, -1))


def test_sample_refuses_steps_for_ddpm_unknown_samplers_and_out_of_range_starts() -> None:
    sched = NoiseSchedule.create("cosine", 100)
    model = Recorder()
    with pytest.raises(UsageError, match="ddpm sampler uses every timestep"):
        sample(model, sched, (1, 1), sampler="ddpm", steps=10)
    with pytest.raises(UsageError, match="--sampler 'euler': expected one of ddpm, ddim, dpm\\+\\+2m"):
        sample(model, sched, (1, 1), sampler="euler")
    with pytest.raises(UsageError, match="t_start"):
        sample(model, sched, (1, 1), sampler="ddim", t_start=100)
    with pytest.raises(UsageError, match=r"--steps 40: must be between 1 and the 31 timesteps from t = 30"):
        sample(model, sched, (1, 1), sampler="ddim", steps=40, t_start=30)
    with pytest.raises(UsageError, match="'leading' spacing starts at t=27"):
        sample(model, sched, (1, 1), sampler="ddim", steps=10, spacing="leading", t_start=30, z_start=torch.zeros(1, 1))


def test_reimagine_starts_from_the_noised_latent() -> None:
    sched = NoiseSchedule.create("cosine", 1000)
    z0 = torch.linspace(-1, 1, 8).reshape(4, 2)
    z_t = forward_noise(sched, z0, 600, torch.Generator().manual_seed(5))
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(z_t, sched.add_noise(z0, torch.full((4,), 600), eps), atol=1e-6)
    assert torch.equal(z_t, forward_noise(sched, z0, 600, torch.Generator().manual_seed(5)))

    seen: list[int] = []
    record = lambda i, t, z, z0: seen.append(t)  # noqa: E731
    sample(Recorder(), sched, (4, 2), sampler="dpm++2m", steps=10, z_start=z_t, t_start=600, callback=record)
    assert seen == sampling_timesteps(601, 10) and seen[0] == 600


# --------------------------------------------------------------------------- seeding


@pytest.mark.parametrize(
    ("solver", "kwargs"), [("ddpm", {}), ("ddim", {"steps": 10, "eta": 0.5}), ("dpm++2m", {"steps": 10})]
)
def test_same_seed_gives_same_samples_and_another_seed_differs(solver: str, kwargs: dict) -> None:
    sched = NoiseSchedule.create("cosine", 50)
    oracle = GaussianOracle(sched, GAUSS_M, GAUSS_S)

    def run(seed: int) -> torch.Tensor:
        return sample(oracle, sched, (6, 2), sampler=solver, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize(("solver", "kwargs"), [("ddpm", {}), ("ddim", {"steps": 10, "eta": 1.0})])
def test_samples_do_not_depend_on_batch_size(solver: str, kwargs: dict) -> None:
    sched = NoiseSchedule.create("cosine", 50)
    oracle = GaussianOracle(sched, GAUSS_M, GAUSS_S)

    def run(batch_size: int) -> list[torch.Tensor]:
        return list(sample_in_batches(oracle, sched, 10, (2,), batch_size, seed=7, sampler=solver, **kwargs))

    by_3, by_8 = run(3), run(8)
    assert [len(b) for b in by_3] == [3, 3, 3, 1] and [len(b) for b in by_8] == [8, 2]
    assert torch.equal(torch.cat(by_3), torch.cat(by_8))
    # sample i is the one its own generator gives on its own
    own_generator = [torch.Generator().manual_seed(7 * 1_000_003 + 4)]
    alone = sample(oracle, sched, (1, 2), sampler=solver, generator=own_generator, **kwargs)
    assert torch.equal(alone[0], torch.cat(by_3)[4])


class SelfConditionedOracle(GaussianOracle):
    """The Gaussian oracle, taking (and recording) a z0 estimate as a self-conditioned network does."""

    self_conditioned = True

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.estimates: list[torch.Tensor] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor, z0_self: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.estimates.append(z0_self.clone())
        return super().__call__(z, t)


@pytest.mark.parametrize("solver, precision", [("ddim", "fp32"), ("dpm++2m", "fp32"), ("ddim", "bf16")])
def test_self_conditioned_model_gets_the_estimate_of_the_step_before(solver: str, precision: str) -> None:
    """Chen et al. 2023: zeros at the first step, then the ẑ0 the previous step returned —
    also through the bf16 wrapper. The samples are those of the plain oracle."""
    sched = NoiseSchedule.create("cosine", 1000)
    oracle = SelfConditionedOracle(sched, GAUSS_M, GAUSS_S)
    returned: list[torch.Tensor] = []
    keep = lambda i, t, z, z0: returned.append(z0.clone())
    kwargs = {"sampler": solver, "steps": 6, "precision": precision}
    out = sample(oracle, sched, (5, 2), callback=keep, generator=torch.Generator().manual_seed(1), **kwargs)
    assert len(oracle.estimates) == 6 and torch.count_nonzero(oracle.estimates[0]) == 0
    for given, before in zip(oracle.estimates[1:], returned[:-1]):
        assert torch.equal(given, before)
    plain = sample(GaussianOracle(sched, GAUSS_M, GAUSS_S), sched, (5, 2), generator=torch.Generator().manual_seed(1),
                   **kwargs)
    assert torch.equal(out, plain)


def test_wrappers_keep_a_model_self_conditioned() -> None:
    """What `ldm sample --trajectory` stacks (recorder in an InferenceModel) still passes the estimate."""
    from ldm_cli.commands.trajectory import TrajectoryRecorder
    from ldm_cli.common.device import InferenceModel, model_in_precision

    oracle = SelfConditionedOracle(NoiseSchedule.create("cosine", 1000), GAUSS_M, GAUSS_S)
    for precision in ("fp32", "bf16"):
        wrapped = InferenceModel(TrajectoryRecorder(model_in_precision(oracle, precision), {0}, 1), precision)
        assert wrapped.self_conditioned
    assert not InferenceModel(GaussianOracle(NoiseSchedule.create("cosine", 10), GAUSS_M, GAUSS_S), "fp32").self_conditioned


def test_ddim_inversion_gives_a_self_conditioned_model_the_estimate_of_the_step_below() -> None:
    """Going up, a self-conditioned model gets z0 itself first, then ẑ0 = α_n·z_n − σ_n·v̂
    of the step below (one model call per step without fixed-point iterations)."""
    sched = NoiseSchedule.create("cosine", 1000)
    oracle = SelfConditionedOracle(sched, GAUSS_M, GAUSS_S)
    inputs: list[torch.Tensor] = []
    recording = lambda z, t, z0_self: inputs.append(z.clone()) or oracle(z, t, z0_self)
    recording.self_conditioned = True  # type: ignore[attr-defined]
    z0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z_top = ddim_invert(recording, sched, z0, steps=5, fixed_point_iters=0)
    assert len(oracle.estimates) == 5 and torch.equal(oracle.estimates[0], z0)
    up = sampling_timesteps(1000, 5)[::-1]
    for k in range(1, 5):
        alpha, sigma = math.sqrt(sched.alpha_bar_at(up[k - 1])), math.sqrt(1 - sched.alpha_bar_at(up[k - 1]))
        z_n = inputs[k]  # without iterations, step k's input is the latent step k−1 produced
        v_hat = GaussianOracle(sched, GAUSS_M, GAUSS_S)(inputs[k - 1], torch.full((4,), up[k - 1]))
        torch.testing.assert_close(oracle.estimates[k], alpha * z_n - sigma * v_hat)
    assert torch.isfinite(z_top).all()
