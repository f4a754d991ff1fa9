"""`ldm train-vae`: the β-VAE as a task of the shared training loop.

Each update draws uint8 images from the cache, maps them to [-1, 1], flips them at
random, and minimises rec(x, x̂) + β(step)·KL (`ldm_cli.training.vae_loss`). At the end the
(EMA) model is exported with the latent statistics of its own training set, so tools
that only have the VAE normalise latents the same way the denoiser will.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ldm_cli.common.pictures import save_grid
from ldm_cli.config import VAERunConfig
from ldm_cli.data.cache import ImageSet
from ldm_cli.data.pixels import random_flip, to_float
from ldm_cli.data.prepare import load_images
from ldm_cli.modelfiles.bundles import export_vae
from ldm_cli.models.latent_stats import measure_latent_stats
from ldm_cli.models.vae import VAE
from ldm_cli.training import rundir
from ldm_cli.training.loop import TrainResult, TrainTask, train
from ldm_cli.training.vae_loss import beta_at, vae_loss

PREVIEW_IMAGES = 8


def preview_inputs(images: ImageSet, count: int = PREVIEW_IMAGES) -> torch.Tensor:
    """Held-out images for previews (training images when there is no held-out split)."""
    source = images.holdout if len(images.holdout) else images.train
    return torch.as_tensor(source[:count])


@torch.no_grad()
def reconstruct_batch(vae: VAE, images_uint8: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean of each image: x̂ = D(μ(x)), in [-1, 1]."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    x_hat = vae.decode(vae.encode(to_float(images_uint8.to(device))).mean)
    vae.train(was_training)
    return x_hat.clamp(-1, 1)


def save_preview(vae: VAE, inputs: torch.Tensor, path: Path, title: str) -> Path:
    """Two rows: the inputs, and their reconstructions."""
    x_hat = reconstruct_batch(vae, inputs).cpu()
    grid = torch.cat((to_float(inputs), x_hat))
    return save_grid(grid, path, ncols=len(inputs), row_labels=["input", "recon"], title=title)


def build_vae_task(config: VAERunConfig, accelerator: Accelerator) -> TrainTask:
    """Data, model, loss, previews and export of a β-VAE run."""
    with accelerator.main_process_first():
        images = load_images(config.data)
    vae = VAE(config.model)
    flip = config.data.flip
    loss_cfg = config.loss
    inputs = preview_inputs(images)

    def get_batch(indices: torch.Tensor) -> torch.Tensor:
        return images.train[indices]

    def loss(model: nn.Module, batch: torch.Tensor, step: int):
        x = to_float(batch)
        if flip:
            x = random_flip(x)
        x_hat, posterior = model(x)
        return vae_loss(x, x_hat, posterior, beta_at(step, loss_cfg), loss_cfg)

    def preview(model: nn.Module, step: int, run_dir: Path) -> Path:
        return save_preview(model, inputs, run_dir / rundir.PREVIEWS / f"step-{step:08d}.png", f"step {step}")

    def export(model: nn.Module, path: Path) -> None:
        device = next(model.parameters()).device
        stats = measure_latent_stats(model, images.train, device=device, seed=config.train.seed)
        export_vae(path, model, stats, config.data, {"steps": config.train.max_steps})

    return TrainTask(
        name=config.task_name, model=vae, num_examples=len(images.train), get_batch=get_batch, loss=loss,
        export=export, preview=preview, metric_panels=["loss", "reconstruction", "kl", "beta"],
        log_scale_panels=["beta", "kl"],
    )


def train_vae(config: VAERunConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train a β-VAE as `config` says; returns where it went and how fast."""
    return train(lambda acc: build_vae_task(config, acc), config, resume=resume, overwrite=overwrite)
