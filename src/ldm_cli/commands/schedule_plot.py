"""`ldm schedule-plot`: noise schedules as a plot, a table, and noised latents decoded.

For each schedule it writes β_t and ᾱ_t for t = 0 … T−1 (`schedules.png`,
`schedules.csv`). Given a VAE and an image, it also encodes the image, normalises its
latent as the denoiser sees latents, noises it with every schedule at each timestep
using the same ε — z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε — decodes each z_t, and writes one grid
(`noised-latents.png`): a row per schedule, a column per timestep.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_cli.common.files import atomic_write, claim_outputs
from ldm_cli.common.pictures import plot_schedules, save_grid
from ldm_cli.data.decoding import load_image_file
from ldm_cli.data.pixels import to_float
from ldm_cli.diffusion.schedules import NoiseSchedule, linear_schedule_warning
from ldm_cli.errors import UsageError
from ldm_cli.modelfiles.bundles import load_vae

MAX_COLUMNS = 12  # a longer schedule is shown at this many evenly spaced timesteps


@dataclass
class SchedulePlotReport:
    schedules: dict[str, NoiseSchedule]
    plot: Path
    table: Path
    warnings: list[str] = field(default_factory=list)
    noised_grid: Path | None = None


def shown_timesteps(timesteps: int, max_columns: int = MAX_COLUMNS) -> list[int]:
    """Every t when T is small, else `max_columns` evenly spaced ones from 0 to T−1."""
    if timesteps <= max_columns:
        return list(range(timesteps))
    return torch.linspace(0, timesteps - 1, max_columns).round().long().unique().tolist()


def write_table(schedules: dict[str, NoiseSchedule], path: Path) -> Path:
    """CSV: t, then β_t and ᾱ_t of each schedule."""
    timesteps = next(iter(schedules.values())).timesteps
    with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t"] + [f"{col}_{name}" for name in schedules for col in ("beta", "alpha_bar")])
        for t in range(timesteps):
            row: list[object] = [t]
            for s in schedules.values():
                row += [f"{s.betas[t].item():.6g}", f"{s.alphas_cumprod[t].item():.6g}"]
            writer.writerow(row)
    return path


@torch.no_grad()
def noised_latent_grid(
    schedules: dict[str, NoiseSchedule], vae_path: Path, image_path: Path, out: Path, seed: int
) -> Path:
    """Decode z_t of one image for each schedule and shown timestep, with one shared ε."""
    bundle = load_vae(vae_path)
    image = load_image_file(image_path, bundle.resolution)
    z0 = bundle.encode(to_float(image.unsqueeze(0)))
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    steps = shown_timesteps(next(iter(schedules.values())).timesteps)
    rows = []
    for schedule in schedules.values():
        t = torch.tensor(steps)
        z_t = schedule.add_noise(z0.expand(len(steps), -1, -1, -1), t, eps.expand(len(steps), -1, -1, -1))
        rows.append(bundle.decode(torch.cat((z0, z_t))))
    grid = torch.cat(rows)
    return save_grid(grid, out, ncols=len(steps) + 1, row_labels=list(schedules),
                     col_labels=["z0"] + [f"t={t}" for t in steps],
                     title="decoded z_t = sqrt(abar_t)·z0 + sqrt(1-abar_t)·eps, the same eps for every schedule")


def run_schedule_plot(
    timesteps: int, out_dir: Path, kinds: list[str] = ("linear", "cosine"), beta_start: float = 1e-4,
    beta_end: float = 0.02, vae_path: Path | None = None, image_path: Path | None = None, seed: int = 0,
    overwrite: bool = False,
) -> SchedulePlotReport:
    """Build each schedule for T steps and write the plot, the table and, optionally, the grid."""
    if (vae_path is None) != (image_path is None):
        raise UsageError("--vae and --image go together: the image is encoded with the VAE")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out '{out_dir}': exists and is not a folder")
    names = ["schedules.png", "schedules.csv"] + (["noised-latents.png"] if vae_path is not None else [])
    claim_outputs([out_dir / name for name in names], overwrite)
    schedules = {kind: NoiseSchedule.create(kind, timesteps, beta_start, beta_end) for kind in kinds}
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {name: {"beta": s.betas.tolist(), "alpha_bar": s.alphas_cumprod.tolist()} for name, s in schedules.items()}
    report = SchedulePlotReport(
        schedules=schedules,
        plot=plot_schedules(curves, out_dir / "schedules.png"),
        table=write_table(schedules, out_dir / "schedules.csv"),
        warnings=[w for w in (linear_schedule_warning(s) for s in schedules.values()) if w],
    )
    if vae_path is not None:
        report.noised_grid = noised_latent_grid(schedules, vae_path, image_path, out_dir / "noised-latents.png", seed)
    return report
