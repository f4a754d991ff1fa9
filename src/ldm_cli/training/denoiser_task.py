"""`ldm train-denoiser`: the v-prediction ConvNeXt U-Net as a task of the shared loop.

Each update draws clean latents z0 — a fresh posterior sample z = μ + σ·ε from the
latent cache (or from the frozen encoder on the fly), normalised with the training
set's statistics — then t ~ U{0, …, T−1} and ε ~ N(0, I), and regresses
v_t = α_t·ε − σ_t·z0 from z_t = α_t·z0 + σ_t·ε (`VPredictionLoss`; docs/MATH.md, §3).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ldm_cli.common.files import file_sha256
from ldm_cli.common.pictures import save_grid
from ldm_cli.config import DenoiserRunConfig
from ldm_cli.data.pixels import random_flip, to_float
from ldm_cli.data.prepare import load_images
from ldm_cli.diffusion.parametrization import VPredictionLoss, draw_timesteps
from ldm_cli.diffusion.sampling import sample
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.errors import UsageError
from ldm_cli.modelfiles.bundles import VAEBundle, export_denoiser, load_vae
from ldm_cli.models.latent_stats import encode_posteriors, stats_of_posterior_samples
from ldm_cli.models.unet import UNet
from ldm_cli.training import rundir
from ldm_cli.training.latent_cache import load_or_build_latent_cache, sample_posterior
from ldm_cli.training.loop import TrainResult, TrainTask, train
from ldm_cli.training.quality import COLUMNS as QUALITY_COLUMNS
from ldm_cli.training.quality import quality_measure

PREVIEW_SAMPLES = 16
PREVIEW_STEPS = 25


def check_latent_shape(config: DenoiserRunConfig, vae: VAEBundle, vae_path: str) -> tuple[int, int, int]:
    """The denoiser's latent shape must be the VAE's at data.resolution (exit 2 if not)."""
    m = config.model
    wanted = (m.latent_channels, m.latent_size, m.latent_size)
    try:
        actual = vae.network.latent_shape(config.data.resolution)
    except ValueError as err:
        raise UsageError(f"data.resolution {config.data.resolution} does not fit the VAE '{vae_path}': {err}") from None
    if wanted != tuple(actual):
        raise UsageError(
            f"denoiser latent shape {wanted} (model.latent_channels, model.latent_size) does not match "
            f"the VAE '{vae_path}', whose latents are {tuple(actual)} at data.resolution {config.data.resolution}"
        )
    return wanted


def resolve_vae_path(config: DenoiserRunConfig) -> str:
    if not config.latents.vae:
        raise UsageError("no VAE given: pass --vae RUN/vae.safetensors (or set latents.vae in the config)")
    return config.latents.vae


def build_denoiser_task(config: DenoiserRunConfig, vae: VAEBundle, accelerator: Accelerator, run_dir: Path) -> TrainTask:
    """Latents, model, v-loss, previews and export of a denoiser run on the (checked) VAE."""
    vae_path = resolve_vae_path(config)
    vae = vae.to(accelerator.device)
    latent_shape = check_latent_shape(config, vae, vae_path)
    with accelerator.main_process_first():
        images = load_images(config.data)
        cache = (load_or_build_latent_cache(config, vae, vae_path, images, run_dir, accelerator.device,
                                            accelerator.is_main_process) if config.latents.cache else None)

    # Statistics of posterior samples z = μ + σ·ε of the training set (docs/MATH.md, §6),
    # drawn from a fixed generator so that every process computes the same numbers.
    generator = torch.Generator().manual_seed(config.train.seed)
    if cache is not None:
        stats = stats_of_posterior_samples(cache.mean, cache.std, generator)
    else:
        mean, std = encode_posteriors(vae.network, images.train, config.latents.encode_batch_size, accelerator.device)
        stats = stats_of_posterior_samples(mean, std, generator)
    stats = stats.scaled(config.diffusion.input_scale)  # latents of std b (Chen 2023; docs/MATH.md, §6)
    latents = vae.with_stats(stats)  # encodes to, and decodes from, the denoiser's latent space

    schedule = NoiseSchedule.from_config(config.diffusion)
    v_loss = VPredictionLoss(schedule, config.diffusion.min_snr_gamma, config.model.self_condition)
    flip = config.data.flip

    def clean_latents(batch: torch.Tensor) -> torch.Tensor:
        if cache is not None:
            return stats.normalize(sample_posterior(batch.float()))
        x = to_float(batch)
        return latents.encode(random_flip(x) if flip else x, sample=True)

    def get_batch(indices: torch.Tensor) -> torch.Tensor:
        return cache.batch(indices) if cache is not None else images.train[indices]

    def loss(model: nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        z0 = clean_latents(batch)
        t = draw_timesteps(len(z0), schedule.timesteps, config.diffusion.timestep_sampling, z0.device)
        return v_loss(model, z0, t, torch.randn_like(z0)), {}

    def preview(model: nn.Module, step: int, run_dir: Path) -> Path:
        was_training = model.training
        model.eval()
        z = sample(model, schedule, (PREVIEW_SAMPLES, *latent_shape), sampler="ddim",
                   steps=min(PREVIEW_STEPS, schedule.timesteps),
                   generator=torch.Generator(device="cpu").manual_seed(config.train.seed), device=accelerator.device)
        model.train(was_training)
        return save_grid(latents.decode(z).cpu(), run_dir / rundir.PREVIEWS / f"step-{step:08d}.png", ncols=8,
                  title=f"DDIM-{PREVIEW_STEPS} samples at step {step}")

    def export(model: nn.Module, path: Path) -> None:
        extra = {"data": config.data.model_dump(mode="json", exclude={"cache_dir"}), "steps": config.train.max_steps,
                 "vae_file": os.path.basename(vae_path)}
        export_denoiser(path, model, schedule, latents, vae.stats, extra)

    num_examples = len(cache) if cache is not None else len(images.train)
    measure = quality_measure(config, schedule, latents, accelerator.device) if accelerator.is_main_process else None
    return TrainTask(name=config.task_name, model=UNet(config.model), num_examples=num_examples, get_batch=get_batch,
                     loss=loss, export=export, preview=preview, metric_panels=["loss", "fd", "legibility"],
                     log_scale_panels=["loss"], measure=measure, measure_every=config.quality.every,
                     measure_columns=QUALITY_COLUMNS if measure is not None else [])


def train_denoiser(config: DenoiserRunConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train the denoiser as `config` says on the latents of `config.latents.vae`."""
    run_dir = Path(config.output.dir)
    # Fail on a missing or mismatched VAE before anything is written.
    vae_path = resolve_vae_path(config)
    vae = load_vae(vae_path)
    check_latent_shape(config, vae, vae_path)
    return train(lambda acc: build_denoiser_task(config, vae, acc, run_dir), config, resume=resume, overwrite=overwrite,
                 identity={"vae_sha256": file_sha256(vae_path)})
