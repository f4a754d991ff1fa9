"""`ldm train-denoiser`: the v-prediction ConvNeXt U-Net as a task of the shared loop.

Each update draws clean latents z0 — a fresh posterior sample z = μ + σ·ε from the
latent cache (or from the frozen encoder on the fly), normalised with the training
set's statistics — then t ~ U{0, …, T−1} and ε ~ N(0, I), and regresses
v_t = √ᾱ_t·ε − √(1−ᾱ_t)·z0 from z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε (Salimans & Ho 2022).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ldm_cli import rundir
from ldm_cli.checkpoint import atomic_write_path
from ldm_cli.config import DenoiserRunConfig
from ldm_cli.data import ImageSet, load_images, random_flip, to_float
from ldm_cli.errors import UsageError
from ldm_cli.exports import VAEBundle, export_denoiser, load_vae
from ldm_cli.latents import (
    LatentCache,
    build_latent_cache,
    encode_posteriors,
    sample_posterior,
    stats_of_posterior_samples,
)
from ldm_cli.losses import v_loss_weights, v_prediction_loss
from ldm_cli.models.unet import UNet
from ldm_cli.samplers import sample
from ldm_cli.schedules import NoiseSchedule
from ldm_cli.training import TrainResult, TrainTask, train
from ldm_cli.viz import save_grid

EXPORT_NAME = "denoiser.safetensors"
PREVIEW_SAMPLES = 16
PREVIEW_STEPS = 25


def check_latent_shape(config: DenoiserRunConfig, vae: VAEBundle, vae_path: str) -> tuple[int, int, int]:
    """The denoiser's latent shape must be the VAE's at data.resolution (exit 2 if not)."""
    m = config.model
    wanted = (m.latent_channels, m.latent_size, m.latent_size)
    try:
        actual = vae.vae.latent_shape(config.data.resolution)
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


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def latent_cache_key(config: DenoiserRunConfig, vae_path: str, images: ImageSet) -> str:
    """What the cache depends on: the VAE file, the data config and the image count."""
    data = config.data.model_dump(mode="json", exclude={"cache_dir"})
    return json.dumps({"vae": _file_digest(vae_path), "data": data, "train_images": len(images.train)}, sort_keys=True)


def load_or_build_latent_cache(
    config: DenoiserRunConfig, vae: VAEBundle, vae_path: str, images: ImageSet, run_dir: Path, device: torch.device,
    is_main: bool,
) -> LatentCache:
    """Reuse RUN/latent-cache.safetensors when its key matches, else encode (main process writes)."""
    path = run_dir / rundir.LATENT_CACHE
    key = latent_cache_key(config, vae_path, images)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                stored_key = (f.metadata() or {}).get("key")
            if stored_key == key:
                tensors = load_file(str(path))
                return LatentCache(mean=tensors["mean"], std=tensors["std"])
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    cache = build_latent_cache(vae.vae, images.train, config.latents.encode_batch_size, device, config.data.flip)
    if is_main:
        tmp = atomic_write_path(path)
        save_file({"mean": cache.mean.contiguous(), "std": cache.std.contiguous()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    return cache


def build_denoiser_task(config: DenoiserRunConfig, vae: VAEBundle, accelerator: Accelerator, run_dir: Path) -> TrainTask:
    """Latents, model, v-loss, previews and export of a denoiser run on the (checked) VAE."""
    vae_path = resolve_vae_path(config)
    vae = vae.to(accelerator.device)
    latent_shape = check_latent_shape(config, vae, vae_path)
    with accelerator.main_process_first():
        images = load_images(config.data)
        cache = (load_or_build_latent_cache(config, vae, vae_path, images, run_dir, accelerator.device,
                                            accelerator.is_main_process) if config.latents.cache else None)

    # Statistics of posterior samples z = μ + σ·ε of the training set (DESIGN.md), drawn
    # from a fixed generator so that every process computes the same numbers.
    generator = torch.Generator().manual_seed(config.train.seed)
    if cache is not None:
        stats = stats_of_posterior_samples(cache.mean, cache.std, generator)
    else:
        mean, std = encode_posteriors(vae.vae, images.train, config.latents.encode_batch_size, accelerator.device)
        stats = stats_of_posterior_samples(mean, std, generator)

    schedule = NoiseSchedule.from_config(config.diffusion)
    unet = UNet(config.model)
    gamma = config.diffusion.min_snr_gamma
    flip = config.data.flip

    def clean_latents(batch: torch.Tensor) -> torch.Tensor:
        if cache is not None:
            return stats.normalize(sample_posterior(batch.float()))
        x = to_float(batch)
        if flip:
            x = random_flip(x)
        with torch.no_grad():
            return stats.normalize(vae.vae.encode(x).sample())

    def get_batch(indices: torch.Tensor) -> torch.Tensor:
        return cache.batch(indices) if cache is not None else images.train[indices]

    def loss(model: nn.Module, batch: torch.Tensor, step: int):
        z0 = clean_latents(batch)
        t = torch.randint(0, schedule.timesteps, (len(z0),), device=z0.device)
        eps = torch.randn_like(z0)
        z_t = schedule.add_noise(z0, t, eps)
        v_hat = model(z_t, t)
        weights = v_loss_weights(schedule.snr(t).to(z0), gamma)
        return v_prediction_loss(v_hat, schedule.v_target(z0, t, eps), weights), {}

    def decode(unet_eval: nn.Module, count: int, seed: int) -> torch.Tensor:
        z = sample(unet_eval, schedule, (count, *latent_shape), sampler="ddim", steps=min(PREVIEW_STEPS, schedule.timesteps),
                   generator=torch.Generator(device="cpu").manual_seed(seed), device=accelerator.device)
        with torch.no_grad():
            return vae.vae.decode(stats.denormalize(z)).clamp(-1, 1).cpu()

    def preview(model: nn.Module, step: int, run_dir: Path) -> None:
        was_training = model.training
        model.eval()
        images_out = decode(model, PREVIEW_SAMPLES, config.train.seed)
        model.train(was_training)
        save_grid(images_out, run_dir / rundir.PREVIEWS / f"step-{step:08d}.png", ncols=8,
                  title=f"DDIM-{PREVIEW_STEPS} samples at step {step}")

    def export(model: nn.Module, run_dir: Path) -> None:
        extra = {"data": config.data.model_dump(mode="json", exclude={"cache_dir"}), "steps": config.train.max_steps,
                 "vae_file": os.path.basename(vae_path)}
        export_denoiser(run_dir / EXPORT_NAME, model, schedule, stats, vae, extra)

    num_examples = len(cache) if cache is not None else len(images.train)
    return TrainTask(name="denoiser", model=unet, num_examples=num_examples, get_batch=get_batch, loss=loss,
                     export=export, preview=preview, metric_panels=["loss"], log_scale_panels=["loss"])


def train_denoiser(config: DenoiserRunConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train the denoiser as `config` says on the latents of `config.latents.vae`."""
    run_dir = Path(config.output.dir)
    # Fail on a missing or mismatched VAE before anything is written.
    vae_path = resolve_vae_path(config)
    vae = load_vae(vae_path)
    check_latent_shape(config, vae, vae_path)
    return train(lambda acc: build_denoiser_task(config, vae, acc, run_dir), config, run_dir,
                 resume=resume, overwrite=overwrite, export_name=EXPORT_NAME)
