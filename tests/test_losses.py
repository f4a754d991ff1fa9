"""β schedule, VAE loss parts, image metrics, the v-loss weighting and self-conditioning, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_cli.config import DiffusionConfig, VAELossConfig
from ldm_cli.diffusion.parametrization import VPredictionLoss, min_snr_weight, v_target, weighted_mse
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.evaluation.image_metrics import ms_ssim, psnr, ssim
from ldm_cli.training.vae_loss import beta_at, reconstruction_loss


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_beta_decays_from_start_to_final(shape):
    cfg = VAELossConfig(beta_start=1e-2, beta_final=1e-4, beta_decay_steps=100, beta_decay_shape=shape)
    assert beta_at(0, cfg) == pytest.approx(1e-2)
    assert beta_at(100, cfg) == pytest.approx(1e-4)
    assert beta_at(10_000, cfg) == pytest.approx(1e-4)
    values = [beta_at(s, cfg) for s in range(0, 101, 5)]
    assert all(a > b for a, b in zip(values, values[1:])), "β must decrease strictly over the decay"


def test_beta_midpoints_match_closed_forms():
    base = dict(beta_start=0.1, beta_final=0.001, beta_decay_steps=200)
    assert beta_at(100, VAELossConfig(**base, beta_decay_shape="linear")) == pytest.approx(0.0505)
    assert beta_at(50, VAELossConfig(**base, beta_decay_shape="cosine")) == pytest.approx(
        0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert beta_at(100, VAELossConfig(**base, beta_decay_shape="exponential")) == pytest.approx(0.01)
    assert beta_at(5, VAELossConfig(beta_start=0.1, beta_final=0.2, beta_decay_steps=0)) == 0.2


def test_psnr_matches_its_closed_form():
    x = torch.zeros(2, 3, 8, 8)
    y = x + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    expected = [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)]
    assert psnr(y, x).tolist() == pytest.approx(expected, rel=1e-5)


def test_ssim_is_one_for_equal_images_and_drops_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert ms_ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    noisy = x + 0.3 * torch.randn(x.shape, generator=g)
    assert (ssim(noisy, x) < 0.9).all() and (ms_ssim(noisy, x) < 0.95).all()
    # A constant shift of the mean only touches the luminance term.
    shifted = x + 0.1
    assert (ssim(shifted, x) > ssim(noisy, x)).all()


def test_reconstruction_loss_is_l1_or_mse_plus_weighted_one_minus_ssim():
    x = torch.zeros(1, 3, 16, 16)
    y = torch.full_like(x, 0.5)
    assert reconstruction_loss(x, y, VAELossConfig(reconstruction="l1")).item() == pytest.approx(0.5)
    assert reconstruction_loss(x, y, VAELossConfig(reconstruction="mse")).item() == pytest.approx(0.25)
    mixed = reconstruction_loss(x, y, VAELossConfig(reconstruction="l1", structural_weight=2.0)).item()
    assert mixed == pytest.approx(0.5 + 2.0 * (1 - ssim(y, x).item()), rel=1e-5)


def test_min_snr_weight_is_min_snr_gamma_over_snr_plus_one_and_weights_mse():
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert min_snr_weight(snr, None).tolist() == [1.0, 1.0, 1.0]
    assert min_snr_weight(snr, 5.0).tolist() == pytest.approx([0.5 / 1.5, 5 / 6, 5 / 51])
    v = torch.zeros(3, 2)
    v_hat = torch.ones(3, 2)
    assert weighted_mse(v_hat, v, torch.tensor([1.0, 0.0, 2.0])).item() == pytest.approx(1.0)


class RecordingModel(torch.nn.Module):
    """v̂ = w·z_t, recording whether each call had gradients on and the estimate it got."""

    self_conditioned = True

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def forward(self, z_t, t, z0_self):
        self.calls.append((torch.is_grad_enabled(), z0_self.detach().clone()))
        return self.w * z_t


def test_self_conditioning_loss_feeds_the_first_pass_estimate_half_the_time():
    """Chen et al. 2023: with probability 1/2 a gradient-free first pass gives
    ẑ0 = α_t·z_t − σ_t·v̂(z_t, t, 0), fed to the second pass; else zeros. The gradient is
    the second pass's alone."""
    schedule = NoiseSchedule.from_config(DiffusionConfig(schedule="cosine", timesteps=100))
    loss_fn = VPredictionLoss(schedule, self_condition=True)
    model = RecordingModel()
    torch.manual_seed(0)
    estimates = 0
    for _ in range(200):
        z0, noise, t = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.randint(0, 100, (4,))
        model.calls.clear()
        loss = loss_fn(model, z0, t, noise)
        assert [grad for grad, _ in model.calls][-1] is True  # the pass the loss is taken on
        if len(model.calls) == 2:
            estimates += 1
            first_grad, first_input = model.calls[0]
            assert first_grad is False and torch.count_nonzero(first_input) == 0
            z_t = schedule.add_noise(z0, t, noise)
            alpha, sigma = schedule.scalings(t, z_t)
            torch.testing.assert_close(model.calls[1][1], alpha * z_t - sigma * (0.5 * z_t))
        else:
            assert len(model.calls) == 1 and torch.count_nonzero(model.calls[0][1]) == 0
        model.w.grad = None
        loss.backward()
        v_hat = model.w.detach() * schedule.add_noise(z0, t, noise)
        assert loss.item() == pytest.approx(((v_hat - v_target(schedule, z0, t, noise)) ** 2).mean().item(), rel=1e-5)
    assert 70 <= estimates <= 130  # Binomial(200, 1/2): mean 100, sd ≈ 7
