"""`ldm reimagine`: partly noise an image's latent and let DDPM and DDIM bring it back.

    image → z0 = E(x) (normalised) → z_t = α_t·z0 + σ_t·ε at t = round(strength·T) − 1
          → DDPM from t (every remaining step) and DDIM (steps·strength steps) → images

One noised latent serves every seed, so the seeds only drive DDPM's reverse noise:
DDPM's rows differ while DDIM (deterministic given z_t) repeats itself. The forward
noise ε has a random stream of its own, independent of every reverse chain's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm_cli.commands.sample import counting_steps
from ldm_cli.commands.trajectory import TRAJECTORY_FRAMES, frame_indices
from ldm_cli.common.device import default_device
from ldm_cli.common.files import claim_outputs
from ldm_cli.common.pictures import save_grid
from ldm_cli.common.progress import ProgressReporter
from ldm_cli.data.decoding import load_image_file
from ldm_cli.data.pixels import to_float
from ldm_cli.diffusion import DEFAULT_STEPS
from ldm_cli.diffusion.samplers import check_sampler_args
from ldm_cli.diffusion.sampling import ddim_invert, forward_noise, plan_timesteps, sample
from ldm_cli.errors import UsageError
from ldm_cli.modelfiles.bundles import DenoiserBundle, load_denoiser

DEFAULT_STRENGTHS = (0.25, 0.5, 0.75, 1.0)
FORWARD_NOISE_STREAM = 0xF0  # names the forward noise's stream of a seed


def start_timestep(strength: float, timesteps: int) -> int:
    """t = strength·T as a code index: strength 1 starts from t = T−1 (pure noise)."""
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"--strength {strength}: must be in (0, 1]")
    return min(timesteps - 1, max(0, round(strength * timesteps) - 1))


def forward_noise_generator(seed: int) -> torch.Generator:
    """The forward noise's own stream: `SeedSequence` mixes (seed, stream) into a 64-bit
    seed, so its numbers are not those of any reverse chain's `manual_seed(seed + k)`."""
    mixed = np.random.SeedSequence([seed % 2**64, FORWARD_NOISE_STREAM]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


@dataclass
class ReimagineReport:
    grid: Path
    trajectory: Path
    start_timesteps: dict[float, int] = field(default_factory=dict)
    ddim_steps: dict[float, int] = field(default_factory=dict)


def run_reimagine(
    checkpoint: Path, image: Path, out_dir: Path, *, strengths: list[float] = DEFAULT_STRENGTHS,
    steps: int = DEFAULT_STEPS, seed: int = 0, num_seeds: int = 1, clip_limit: float | None = None,
    device: torch.device | None = None, overwrite: bool = False, invert: bool = False,
) -> ReimagineReport:
    """Take an image's latent to t = strength·T — by fresh forward noise, or with `invert`
    by deterministic DDIM inversion (docs/MATH.md, §5) — and let DDPM and DDIM bring it back.
    From an inverted latent DDIM gives the input back; from fresh noise it gives a new face."""
    if num_seeds < 1:
        raise UsageError(f"--num-seeds {num_seeds}: must be at least 1")
    for strength in strengths:
        start_timestep(strength, 1)  # validate every strength before any work
    claim_outputs([out_dir / "reimagine.png", out_dir / "reimagine-trajectory.png"], overwrite)
    bundle = load_denoiser(checkpoint)
    T = bundle.schedule.timesteps
    check_sampler_args("ddim", steps, 0.0, clip_limit, "trailing", T)
    starts = {s: start_timestep(s, T) for s in strengths}
    device = device or default_device()
    bundle.to(device)
    original = to_float(load_image_file(image, bundle.vae.resolution).unsqueeze(0))
    z0 = bundle.vae.encode(original.to(device))
    ddim_steps = {s: max(1, min(t + 1, round(steps * s))) for s, t in starts.items()}
    middle = sorted(strengths)[len(strengths) // 2]

    noised, ddpm_out, ddim_out = {}, {}, {}
    what = f"reimagine {len(starts)} strength(s) × {num_seeds} seed(s), DDPM and DDIM"
    with ProgressReporter(what, model_evaluations(bundle, starts, ddim_steps, middle), unit="steps") as progress:
        for strength, t in starts.items():
            z_t = start_latent(bundle, z0, t, ddim_steps[strength], seed, invert).repeat(num_seeds, 1, 1, 1)
            chains = [torch.Generator().manual_seed(seed + k) for k in range(num_seeds)]
            common = dict(z_start=z_t, t_start=t, clip_limit=clip_limit, device=device,
                          callback=counting_steps(progress))
            noised[strength] = z_t[:1]
            ddpm_out[strength] = sample(bundle.unet, bundle.schedule, z_t.shape, sampler="ddpm", generator=chains,
                                        **common)
            ddim_out[strength] = sample(bundle.unet, bundle.schedule, z_t.shape, sampler="ddim",
                                        steps=ddim_steps[strength], **common)
        grid = save_reimagine_grid(bundle, original, strengths, starts, noised, ddpm_out, ddim_out, seed, steps,
                                   out_dir, "inverted z_t" if invert else "noised z_t")
        trajectory = reimagine_trajectory(bundle, noised[middle], starts[middle], middle, ddim_steps[middle], seed,
                                          clip_limit, device, out_dir, progress)
    return ReimagineReport(grid=grid, trajectory=trajectory, start_timesteps=starts, ddim_steps=ddim_steps)


def chain_evaluations(bundle: DenoiserBundle, t: int, ddim_steps: int) -> int:
    """Model evaluations of one DDPM and one DDIM chain from t."""
    ddpm = plan_timesteps(bundle.schedule, "ddpm", None, "trailing", t)
    ddim = plan_timesteps(bundle.schedule, "ddim", ddim_steps, "trailing", t)
    return len(ddpm) + len(ddim)


def model_evaluations(bundle: DenoiserBundle, starts: dict[float, int], ddim_steps: dict[float, int],
                      middle: float) -> int:
    """What reimagine's progress counts: both chains at every strength, then both again for the trajectory."""
    grid = sum(chain_evaluations(bundle, t, ddim_steps[s]) for s, t in starts.items())
    return grid + chain_evaluations(bundle, starts[middle], ddim_steps[middle])


def start_latent(bundle: DenoiserBundle, z0: torch.Tensor, t: int, ddim_steps: int, seed: int,
                 invert: bool) -> torch.Tensor:
    """z_t of the image: DDIM-inverted along the chain DDIM will run back (deterministic), or
    ``α_t·z0 + σ_t·ε`` with ε from the forward noise's own stream."""
    if invert:
        return ddim_invert(bundle.unet, bundle.schedule, z0, ddim_steps, t_start=t)
    return forward_noise(bundle.schedule, z0, t, forward_noise_generator(seed))


def save_reimagine_grid(
    bundle: DenoiserBundle, original: torch.Tensor, strengths: list[float], starts: dict[float, int],
    noised: dict[float, torch.Tensor], ddpm_out: dict[float, torch.Tensor], ddim_out: dict[float, torch.Tensor],
    seed: int, steps: int, out_dir: Path, start_label: str = "noised z_t",
) -> Path:
    """A column per strength; rows: the noised latent, then DDPM and DDIM for each seed."""
    def decoded(latents: dict[float, torch.Tensor], k: int) -> list[torch.Tensor]:
        return [bundle.vae.decode(latents[s][k : k + 1]).cpu() for s in strengths]

    blank = torch.ones_like(original)
    rows = [torch.cat([original] + decoded(noised, 0))]
    labels = [start_label]
    for k in range(len(next(iter(ddpm_out.values())))):
        rows += [torch.cat([blank] + decoded(ddpm_out, k)), torch.cat([blank] + decoded(ddim_out, k))]
        labels += [f"DDPM seed {seed + k}", f"DDIM seed {seed + k}"]
    cols = ["original"] + [f"s={s} t={starts[s]}" for s in strengths]
    return save_grid(torch.cat(rows), out_dir / "reimagine.png", ncols=len(strengths) + 1, row_labels=labels,
                     col_labels=cols, title=f"reimagine: DDPM (all steps from t) vs DDIM ({steps}·strength steps)")


def reimagine_trajectory(
    bundle: DenoiserBundle, z_t: torch.Tensor, t: int, strength: float, ddim_steps: int, seed: int,
    clip_limit: float | None, device: torch.device, out_dir: Path, progress: ProgressReporter,
) -> Path:
    """The intermediate ẑ0 of DDPM (first seed) and DDIM from the same noised latent, one row each."""
    rows, labels = [], []
    for sampler, steps in (("ddpm", None), ("ddim", ddim_steps)):
        keep = set(frame_indices(t + 1 if sampler == "ddpm" else steps))
        predictions: list[torch.Tensor] = []

        def keep_prediction(i: int, _t: int, _z: torch.Tensor, z0_hat: torch.Tensor) -> None:
            if i in keep:
                predictions.append(z0_hat.clone())

        sample(bundle.unet, bundle.schedule, z_t.shape, sampler=sampler, steps=steps,
               generator=[torch.Generator().manual_seed(seed)], z_start=z_t, t_start=t, clip_limit=clip_limit,
               device=device, callback=counting_steps(progress, keep_prediction))
        frames = bundle.vae.decode(torch.cat([z_t] + predictions)).cpu()
        pad = TRAJECTORY_FRAMES + 1 - len(frames)
        rows.append(torch.cat([frames, torch.ones_like(frames[:1]).repeat(max(0, pad), 1, 1, 1)]))
        labels.append(sampler.upper())
    return save_grid(torch.cat(rows), out_dir / "reimagine-trajectory.png", ncols=TRAJECTORY_FRAMES + 1,
                     row_labels=labels,
                     title=f"strength {strength} (t={t}): noised z_t, then the predicted clean z0 along the reverse process")
