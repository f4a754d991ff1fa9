"""Images from a denoiser file: `ldm sample` and `ldm reimagine`.

Both run the samplers of `ldm_cli.samplers` in the denoiser's normalised latent space
and decode with the bundled VAE: x = D(z·std + mean).

sample     z_T ~ N(0, I) → DDPM (all T steps) / DDIM / DPM-Solver++ → ẑ0 → images
reimagine  image → μ = E(x) → z_t = √ᾱ_t·μ + √(1−ᾱ_t)·ε at t = strength·T
           → DDPM from t (every remaining step) and DDIM (steps·strength steps) → images
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_cli.data import load_image_file, to_float
from ldm_cli.errors import UsageError
from ldm_cli.exports import DenoiserBundle, load_denoiser
from ldm_cli.outputs import claim_outputs
from ldm_cli.samplers import SAMPLERS, forward_noise, sample, sample_in_batches
from ldm_cli.viz import save_grid, save_images

GRID_MAX = 64  # the grid shows at most this many samples; every sample gets its own PNG
TRAJECTORY_SAMPLES = 4
TRAJECTORY_FRAMES = 10


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_sampling_args(sampler: str, steps: int | None, eta: float, clip_limit: float | None, timesteps: int) -> None:
    """Validate the options every sampling command shares (exit 2 with the reason)."""
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if steps is not None and not 1 <= steps <= timesteps:
        raise UsageError(f"--steps {steps}: must be between 1 and the model's T = {timesteps}")
    if not 0.0 <= eta <= 1.0:
        raise UsageError(f"--eta {eta}: must be in [0, 1]")
    if eta > 0 and sampler != "ddim":
        raise UsageError(f"--eta applies to the ddim sampler only, not {sampler}")
    if clip_limit is not None and clip_limit <= 0:
        raise UsageError(f"--clip-limit {clip_limit}: must be positive")


@torch.no_grad()
def decode_latents(bundle: DenoiserBundle, z: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (CPU) from normalised latents: x = D(z·std + mean)."""
    return bundle.vae.vae.decode(bundle.stats.denormalize(z)).clamp(-1, 1).cpu()


def frame_indices(num_steps: int, frames: int = TRAJECTORY_FRAMES) -> list[int]:
    """About `frames` step indices from the first to the last step, evenly spaced."""
    if num_steps <= frames:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (frames - 1)) for i in range(frames)})


class TrajectoryRecorder:
    """Keeps z_t (the model's input) and ẑ0 (its prediction) at chosen steps of one run."""

    def __init__(self, model: Callable, keep: set[int], count: int):
        self.model, self.keep, self.count = model, keep, count
        self.step = 0
        self.timesteps: list[int] = []
        self.z_t: list[torch.Tensor] = []
        self.z0_hat: list[torch.Tensor] = []
        self.active = True

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.active and self.step in self.keep:
            self.timesteps.append(int(t[0]))
            self.z_t.append(z[: self.count].detach().clone())
        return self.model(z, t)

    def callback(self, i: int, t: int, z: torch.Tensor, z0_hat: torch.Tensor) -> None:
        if self.active and self.step in self.keep:
            self.z0_hat.append(z0_hat[: self.count].detach().clone())
        self.step += 1

    def save(self, bundle: DenoiserBundle, path: Path, title: str) -> Path:
        """Grid: for each kept sample a z_t row and a ẑ0 row; a column per kept timestep."""
        frames = len(self.timesteps)
        z_t = decode_latents(bundle, torch.cat(self.z_t)).unflatten(0, (frames, self.count))
        z0 = decode_latents(bundle, torch.cat(self.z0_hat)).unflatten(0, (frames, self.count))
        rows, labels = [], []
        for s in range(self.count):
            rows += [z_t[:, s], z0[:, s]]
            labels += [f"#{s} z_t", f"#{s} pred. z0"]
        return save_grid(torch.cat(rows), path, ncols=frames, row_labels=labels,
                         col_labels=[f"t={t}" for t in self.timesteps], title=title)


# --------------------------------------------------------------------------- sample


@dataclass
class SampleReport:
    out_dir: Path
    grid: Path
    images: list[Path]
    trajectory: Path | None
    timesteps_used: int
    seconds: float = 0.0


def run_sample(
    checkpoint: Path, out_dir: Path, *, num_samples: int = 25, seed: int = 42, sampler: str = "ddpm",
    steps: int | None = None, eta: float = 0.0, clip_limit: float | None = None, batch_size: int = 25,
    trajectory: bool = False, spacing: str = "trailing", device: torch.device | None = None,
    overwrite: bool = False,
) -> SampleReport:
    """Sample `num_samples` images in batches; write a grid, one PNG each, and a trajectory."""
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: must be at least 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    claim_outputs([out_dir / "grid.png", out_dir / "images"] + ([out_dir / "trajectory.png"] if trajectory else []),
                  overwrite)
    for stale in sorted((out_dir / "images").glob("[0-9]*.png")):  # only reached with --overwrite
        stale.unlink()
    bundle = load_denoiser(checkpoint)
    T = bundle.schedule.timesteps
    check_sampling_args(sampler, steps, eta, clip_limit, T)
    if sampler != "ddpm" and steps is None:
        steps = min(50, T)
    device = device or default_device()
    bundle.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)

    num_steps = T if sampler == "ddpm" else steps
    traced = min(TRAJECTORY_SAMPLES, num_samples, batch_size)  # all from the first batch
    recorder = TrajectoryRecorder(bundle.unet, set(frame_indices(num_steps)), traced)
    model = recorder if trajectory else bundle.unet
    started = time.perf_counter()
    shown: list[torch.Tensor] = []
    written: list[Path] = []
    batches = sample_in_batches(
        model, bundle.schedule, num_samples, bundle.latent_shape, batch_size, seed, sampler=sampler, steps=steps,
        eta=eta, clip_limit=clip_limit, spacing=spacing, device=device,
        callback=recorder.callback if trajectory else None,
    )
    for z in batches:
        recorder.active = False  # only the first batch is traced
        images = decode_latents(bundle, z)
        written += save_images(images, out_dir / "images", start_index=len(written))
        if sum(len(s) for s in shown) < GRID_MAX:
            shown.append(images[: GRID_MAX - sum(len(s) for s in shown)])
    seconds = time.perf_counter() - started
    grid_images = torch.cat(shown)
    label = f"{sampler.upper()}-{num_steps}" + (f", clip {clip_limit}" if clip_limit else "") + f", seed {seed}"
    grid = save_grid(grid_images, out_dir / "grid.png", ncols=math.ceil(math.sqrt(len(grid_images))), title=label)
    trajectory_path = None
    if trajectory:
        trajectory_path = recorder.save(bundle, out_dir / "trajectory.png",
                                        f"reverse process, {label}: model input z_t and predicted clean z0")
    return SampleReport(out_dir, grid, written, trajectory_path, num_steps, seconds)


# --------------------------------------------------------------------------- reimagine


def start_timestep(strength: float, timesteps: int) -> int:
    """t = strength·T as a code index: strength 1 starts from t = T−1 (pure noise)."""
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"--strength {strength}: must be in (0, 1]")
    return min(timesteps - 1, max(0, round(strength * timesteps) - 1))


@dataclass
class ReimagineReport:
    grid: Path
    trajectory: Path
    start_timesteps: dict[float, int] = field(default_factory=dict)
    ddim_steps: dict[float, int] = field(default_factory=dict)


def run_reimagine(
    checkpoint: Path, image: Path, out_dir: Path, *, strengths: list[float] = (0.25, 0.5, 0.75, 1.0),
    steps: int = 50, seed: int = 0, num_seeds: int = 1, clip_limit: float | None = None,
    device: torch.device | None = None, overwrite: bool = False,
) -> ReimagineReport:
    """Noise an image's latent to t = strength·T and let DDPM and DDIM bring it back."""
    if num_seeds < 1:
        raise UsageError(f"--num-seeds {num_seeds}: must be at least 1")
    for strength in strengths:
        start_timestep(strength, 1)  # validate every strength before any work
    claim_outputs([out_dir / "reimagine.png", out_dir / "reimagine-trajectory.png"], overwrite)
    bundle = load_denoiser(checkpoint)
    T = bundle.schedule.timesteps
    check_sampling_args("ddim", steps, 0.0, clip_limit, T)
    starts = {s: start_timestep(s, T) for s in strengths}
    device = device or default_device()
    bundle.to(device)
    x = to_float(load_image_file(image, bundle.vae.resolution).unsqueeze(0)).to(device)
    with torch.no_grad():
        z0 = bundle.stats.normalize(bundle.vae.vae.encode(x).mean)

    noised, ddpm_out, ddim_out, ddim_steps = [], [], [], {}
    for strength, t in starts.items():
        ddim_steps[strength] = max(1, min(t + 1, round(steps * strength)))
        # One noised latent for every seed: the seeds then only drive DDPM's reverse
        # noise, so DDPM's rows differ while DDIM (deterministic given z_t) repeats itself.
        z_t = forward_noise(bundle.schedule, z0, t, torch.Generator().manual_seed(seed)).repeat(num_seeds, 1, 1, 1)
        gens = [torch.Generator().manual_seed(seed + k) for k in range(num_seeds)]
        noised.append(z_t[:1])
        common = dict(z_start=z_t, t_start=t, clip_limit=clip_limit, device=device)
        ddpm_out.append(sample(bundle.unet, bundle.schedule, z_t.shape, sampler="ddpm", generator=gens, **common))
        ddim_out.append(sample(bundle.unet, bundle.schedule, z_t.shape, sampler="ddim", steps=ddim_steps[strength], **common))

    # Grid: a column per strength; rows: noised latent, then DDPM and DDIM for each seed.
    original = to_float(load_image_file(image, bundle.vae.resolution).unsqueeze(0))
    blank = torch.ones_like(original)
    rows = [torch.cat([original] + [decode_latents(bundle, z) for z in noised])]
    labels = ["noised z_t"]
    for k in range(num_seeds):
        rows.append(torch.cat([blank] + [decode_latents(bundle, z[k : k + 1]) for z in ddpm_out]))
        rows.append(torch.cat([blank] + [decode_latents(bundle, z[k : k + 1]) for z in ddim_out]))
        labels += [f"DDPM seed {seed + k}", f"DDIM seed {seed + k}"]
    cols = ["original"] + [f"s={s} t={starts[s]}" for s in strengths]
    grid = save_grid(torch.cat(rows), out_dir / "reimagine.png", ncols=len(strengths) + 1, row_labels=labels,
                     col_labels=cols, title=f"reimagine: DDPM (all steps from t) vs DDIM ({steps}·strength steps)")

    trajectory = reimagine_trajectory(bundle, z0, starts, strengths, ddim_steps, seed, clip_limit, device, out_dir)
    return ReimagineReport(grid=grid, trajectory=trajectory, start_timesteps=starts, ddim_steps=ddim_steps)


def reimagine_trajectory(
    bundle: DenoiserBundle, z0: torch.Tensor, starts: dict[float, int], strengths: list[float],
    ddim_steps: dict[float, int], seed: int, clip_limit: float | None, device: torch.device, out_dir: Path,
) -> Path:
    """The intermediate ẑ0 of DDPM and DDIM for the middle strength, one row each."""
    strength = sorted(strengths)[len(strengths) // 2]
    t = starts[strength]
    rows, labels = [], []
    for sampler, steps in (("ddpm", None), ("ddim", ddim_steps[strength])):
        g = torch.Generator().manual_seed(seed)
        z_t = forward_noise(bundle.schedule, z0, t, g)
        num_steps = t + 1 if sampler == "ddpm" else steps
        keep = set(frame_indices(num_steps))
        predictions: list[torch.Tensor] = []

        def keep_prediction(i: int, _t: int, _z: torch.Tensor, z0_hat: torch.Tensor) -> None:
            if i in keep:
                predictions.append(z0_hat.clone())

        sample(bundle.unet, bundle.schedule, z_t.shape, sampler=sampler, steps=steps, generator=g, z_start=z_t,
               t_start=t, clip_limit=clip_limit, device=device, callback=keep_prediction)
        frames = decode_latents(bundle, torch.cat([z_t] + predictions))
        pad = TRAJECTORY_FRAMES + 1 - len(frames)
        rows.append(torch.cat([frames, torch.ones_like(frames[:1]).repeat(max(0, pad), 1, 1, 1)]))
        labels.append(f"{sampler.upper()}")
    return save_grid(torch.cat(rows), out_dir / "reimagine-trajectory.png", ncols=TRAJECTORY_FRAMES + 1,
                     row_labels=labels, title=f"strength {strength} (t={t}): noised z_t, then the predicted clean z0 along the reverse process")
