"""β schedule, VAE loss parts, image metrics and the v-loss weighting, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_cli.config import VAELossConfig
from ldm_cli.diffusion.parametrization import min_snr_weight, weighted_mse
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
