"""Timestep sampling and input scaling of the denoiser's training (docs/MATH.md §3 and §6)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_denoiser_overrides
from ldm_cli.config import DenoiserRunConfig, load_config
from ldm_cli.diffusion.parametrization import draw_timesteps
from ldm_cli.errors import ConfigError
from ldm_cli.models.latent_stats import LatentStats
from ldm_cli.training.denoiser_task import train_denoiser


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_uniform_timesteps_cover_every_t_evenly():
    torch.manual_seed(0)
    t = draw_timesteps(100_000, 10, "uniform")
    counts = torch.bincount(t, minlength=10).double() / len(t)
    assert t.dtype == torch.long and counts.numel() == 10
    assert torch.allclose(counts, torch.full((10,), 0.1, dtype=torch.float64), atol=0.005)


@pytest.mark.parametrize("k", [100, 250, 500, 900])
def test_logit_normal_timesteps_follow_phi_of_the_logit(k):
    """P(t < k) = P(T·s(u) < k) = Φ(logit(k/T)) for u ~ N(0, 1)."""
    T = 1000
    torch.manual_seed(0)
    t = draw_timesteps(200_000, T, "logit-normal")
    assert int(t.min()) >= 0 and int(t.max()) <= T - 1
    expected = normal_cdf(math.log(k / T) - math.log(1 - k / T))
    assert float((t < k).double().mean()) == pytest.approx(expected, abs=0.004)


def test_an_unknown_timestep_sampling_is_a_config_error():
    with pytest.raises(ConfigError, match="diffusion.timestep_sampling"):
        load_config(DenoiserRunConfig, None, ["diffusion.timestep_sampling=beta"])
    with pytest.raises(ConfigError, match="diffusion.input_scale"):
        load_config(DenoiserRunConfig, None, ["diffusion.input_scale=0"])


def test_scaled_statistics_normalise_to_std_b_and_decode_back():
    stats = LatentStats(mean=torch.tensor([0.5, -1.0]), std=torch.tensor([2.0, 0.5]))
    z = torch.randn(4096, 2, 3, 3) * stats.std.view(1, 2, 1, 1) + stats.mean.view(1, 2, 1, 1)
    scaled = stats.scaled(0.5)
    z_n = scaled.normalize(z)
    assert torch.allclose(z_n, 0.5 * stats.normalize(z), atol=1e-6)
    assert torch.allclose(scaled.denormalize(z_n), z, atol=1e-5)
    assert stats.scaled(1.0) is stats


def test_input_scale_divides_the_exported_latent_std_by_b(tmp_path, trained_vae):
    stds = {}
    for b in (1.0, 0.5):
        out = tmp_path / f"b{b}"
        overrides = tiny_denoiser_overrides(out, trained_vae, steps=3) + [f"diffusion.input_scale={b}",
                                                                          "diffusion.timestep_sampling=logit-normal"]
        train_denoiser(load_config(DenoiserRunConfig, None, overrides))
        stds[b] = load_file(str(out / "denoiser.safetensors"))["latent_stats.std"]
    assert torch.allclose(stds[0.5], 2 * stds[1.0])


def test_a_self_conditioned_denoiser_trains_exports_and_samples(tmp_path, trained_vae):
    """model.self_condition (Chen et al. 2023) end to end: the loss falls, the exported file
    rebuilds a network with 2·C input channels, and sample (with its trajectory) and
    reimagine (with DDIM inversion) run on it."""
    from ldm_cli.commands.reimagine import run_reimagine
    from ldm_cli.commands.sample import run_sample
    from ldm_cli.data.faces import draw_face
    from ldm_cli.modelfiles.bundles import load_denoiser

    out = tmp_path / "run"
    overrides = tiny_denoiser_overrides(out, trained_vae, steps=40) + ["model.self_condition=true", "logging.log_every=5"]
    train_denoiser(load_config(DenoiserRunConfig, None, overrides))
    with open(out / "metrics.csv", newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")]
    bundle = load_denoiser(out / "denoiser.safetensors")
    assert bundle.unet.self_conditioned and bundle.unet.conv_in.in_channels == 2 * bundle.unet.cfg.latent_channels
    for trajectory in (True, False):  # recording the reverse process must not change what the model is given
        run_sample(out / "denoiser.safetensors", tmp_path / f"samples-{trajectory}", num_samples=3, sampler="ddim",
                   steps=5, trajectory=trajectory, device=torch.device("cpu"), precision="fp32")
    with_trajectory = sorted((tmp_path / "samples-True" / "images").glob("*.png"))
    assert len(with_trajectory) == 3
    for png in with_trajectory:
        assert png.read_bytes() == (tmp_path / "samples-False" / "images" / png.name).read_bytes()
    face = tmp_path / "face.png"
    draw_face(3, 16).save(face)
    run_reimagine(out / "denoiser.safetensors", face, tmp_path / "reimagined", strengths=[0.5], steps=4,
                  invert=True, device=torch.device("cpu"))
    assert (tmp_path / "reimagined" / "reimagine.png").is_file()
    assert len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2])
