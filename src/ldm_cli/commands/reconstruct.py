"""`ldm reconstruct`: inputs beside reconstructions, with PSNR/SSIM, and the latent space.

Three pictures judge a β-VAE:
  OUT/reconstructions.png  input | reconstruction, one row per image, labelled with PSNR
  OUT/interpolations.png   decoded z = (1−w)·μ_a + w·μ_b between pairs of inputs
  OUT/prior.png            decoded prior samples z ~ N(0, I): where the decoder leaves
                           the data manifold, these show it
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.common.files import claim_outputs
from ldm_cli.common.pictures import image_grid, save_grid, save_png
from ldm_cli.config import DataConfig
from ldm_cli.data.pixels import to_float
from ldm_cli.data.prepare import load_images
from ldm_cli.errors import UsageError
from ldm_cli.evaluation.image_metrics import psnr, ssim
from ldm_cli.modelfiles.bundles import VAEBundle, load_vae
from ldm_cli.training.vae_task import reconstruct_batch

INTERPOLATION_STEPS = 8


@dataclass
class ReconstructionReport:
    psnr: list[float]
    ssim: list[float]
    grid: Path
    interpolations: Path
    prior_samples: Path

    @property
    def mean_psnr(self) -> float:
        return sum(self.psnr) / len(self.psnr)

    @property
    def mean_ssim(self) -> float:
        return sum(self.ssim) / len(self.ssim)


def evaluation_images(bundle: VAEBundle, source: str | None, num: int) -> torch.Tensor:
    """`num` uint8 images: the VAE's own held-out split by default, else those of `source`."""
    if source is None or source == bundle.data.source:
        images = load_images(bundle.data)
        pool = images.holdout if len(images.holdout) else images.train
    else:
        images = load_images(DataConfig(source=source, resolution=bundle.resolution, holdout_fraction=0.0))
        pool = images.train
    return torch.as_tensor(pool[:num])


def interpolate(vae_bundle: VAEBundle, images: torch.Tensor, steps: int = INTERPOLATION_STEPS) -> torch.Tensor:
    """Decoded linear interpolations μ_a → μ_b for consecutive pairs, row-major."""
    vae = vae_bundle.network
    device = vae_bundle.device
    with torch.no_grad():
        mu = vae.encode(to_float(images.to(device))).mean
        weights = torch.linspace(0, 1, steps, device=device).view(-1, 1, 1, 1)
        rows = [vae.decode((1 - weights) * mu[i] + weights * mu[i + 1]) for i in range(0, len(mu) - 1, 2)]
    return torch.cat(rows).clamp(-1, 1).cpu()


def prior_samples(vae_bundle: VAEBundle, count: int, seed: int) -> torch.Tensor:
    """Decoded z ~ N(0, I) in the VAE's own (unnormalised) latent space."""
    vae = vae_bundle.network
    device = vae_bundle.device
    z = torch.randn((count, *vae_bundle.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return vae.decode(z.to(device)).clamp(-1, 1).cpu()


def output_paths(out_dir: Path) -> tuple[Path, Path, Path]:
    """The grid, the interpolations and the prior samples, in the output folder."""
    return out_dir / "reconstructions.png", out_dir / "interpolations.png", out_dir / "prior.png"


def run_reconstruct(
    vae_path: Path, out_dir: Path, source: str | None = None, num: int = 5, seed: int = 0, overwrite: bool = False
) -> ReconstructionReport:
    """Write the three pictures for `num` images into `out_dir`; return per-image PSNR/SSIM."""
    if num < 1:
        raise UsageError(f"--num must be at least 1 (got {num})")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out '{out_dir}': exists and is not a folder")
    grid_path, interpolations_path, prior_path = output_paths(out_dir)
    claim_outputs([grid_path, interpolations_path, prior_path], overwrite)
    bundle = load_vae(vae_path)
    images = evaluation_images(bundle, source, num)
    x = to_float(images)
    x_hat = reconstruct_batch(bundle.network, images).cpu()
    scores_psnr = psnr(x_hat, x).tolist()
    scores_ssim = ssim(x_hat, x).tolist()

    pairs = torch.stack((x, x_hat), dim=1).flatten(0, 1)
    labels = [f"#{i} {p:.1f} dB" for i, p in enumerate(scores_psnr)]
    grid = save_grid(pairs, grid_path, ncols=2, col_labels=["input", "output"], row_labels=labels,
                     title=f"mean PSNR {sum(scores_psnr) / len(scores_psnr):.2f} dB")
    pair_images = images if len(images) >= 2 else images.repeat(2, 1, 1, 1)
    interpolations = save_grid(interpolate(bundle, pair_images), interpolations_path,
                               ncols=INTERPOLATION_STEPS, title="latent interpolation between input pairs")
    prior = save_png(image_grid(prior_samples(bundle, 16, seed), 8, title="decoded prior samples z ~ N(0, I)"),
                     prior_path)
    return ReconstructionReport(scores_psnr, scores_ssim, grid, interpolations, prior)
