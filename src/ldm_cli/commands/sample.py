"""`ldm sample`: images from a denoiser file.

    z_T ~ N(0, I) → DDPM (all T steps) / DDIM / DPM-Solver++ → ẑ0 → x = D(ẑ0·std + mean)

The samplers run in the denoiser's normalised latent space
(`ldm_cli.diffusion.sampling`) and the bundled VAE decodes (`VAEBundle.decode`). Each
image draws its noise from its own seed, so a seed gives the same images whatever the
batch size (bit for bit in float32; in bf16 the network's kernels round differently for
other batch sizes, which can move a pixel by one level), and memory does not grow with
the number of images.

Beside the images, `sample.json` records how they were made (the checkpoint's absolute
path, the sampler, its number of steps and the seed): `ldm evaluate` finds the model
there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.commands.trajectory import TrajectoryRecorder, frame_indices, save_trajectory_gif, save_trajectory_grid
from ldm_cli.common.device import InferenceModel, default_device, model_in_precision, resolve_precision
from ldm_cli.common.files import atomic_write, claim_outputs
from ldm_cli.common.pictures import save_grid, save_images
from ldm_cli.common.progress import ProgressReporter
from ldm_cli.diffusion.samplers import check_batch_size, check_sampler_args
from ldm_cli.diffusion.sampling import Callback, plan_timesteps, sample_in_batches
from ldm_cli.errors import UsageError
from ldm_cli.modelfiles.bundles import load_denoiser

logger = logging.getLogger("ldm")

SAMPLE_RECORD = "sample.json"
GRID_MAX = 64  # the grid shows at most this many samples; every sample gets its own PNG
TRAJECTORY_SAMPLES = 4


@dataclass
class SampleReport:
    out_dir: Path
    grid: Path
    images: list[Path]
    trajectory: Path | None
    timesteps_used: int
    seconds: float = 0.0
    trajectory_gif: Path | None = None  # the reverse process as an animation, with `trajectory`


def counting_steps(progress: ProgressReporter, then: Callback | None = None) -> Callback:
    """A sampler callback that counts each step (one model evaluation of a batch), then calls `then`."""
    def callback(i: int, t: int, z: torch.Tensor, z0_hat: torch.Tensor) -> None:
        progress.advance()
        if then is not None:
            then(i, t, z, z0_hat)
    return callback


def write_sample_record(path: Path, checkpoint: Path, sampler: str, steps: int, seed: int,
                        precision: str = "fp32") -> Path:
    """`sample.json`: the checkpoint (absolute), the sampler, its steps, the seed and the model
    calls' precision, written atomically."""
    record = {"checkpoint": str(Path(checkpoint).resolve()), "sampler": sampler, "steps": steps, "seed": seed,
              "precision": precision}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def run_sample(
    checkpoint: Path, out_dir: Path, *, num_samples: int = 25, seed: int = 42, sampler: str = "ddpm",
    steps: int | None = None, eta: float = 0.0, clip_limit: float | None = None, batch_size: int = 25,
    trajectory: bool = False, spacing: str = "trailing", device: torch.device | None = None,
    overwrite: bool = False, precision: str = "auto", compile: bool = False,
) -> SampleReport:
    """Sample `num_samples` images in batches; write a grid, one PNG each, and a trajectory (PNG and GIF).

    Progress counts model evaluations: batches × sampler steps. `precision` is that of the
    model calls (`common.device.resolve_precision`: auto is bf16 where the device runs it natively);
    `compile` compiles the network first (`common.device.model_in_precision`), which pays for
    itself from a few thousand images on a CPU."""
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: must be at least 1")
    check_batch_size(batch_size)
    device = device or default_device()
    precision = resolve_precision(precision, device)
    trajectory_files = [out_dir / "trajectory.png", out_dir / "trajectory.gif"] if trajectory else []
    claim_outputs([out_dir / "grid.png", out_dir / "images", out_dir / SAMPLE_RECORD, *trajectory_files], overwrite)
    for stale in sorted((out_dir / "images").glob("[0-9]*.png")):  # only reached with --overwrite
        stale.unlink()
    bundle = load_denoiser(checkpoint)
    T = bundle.schedule.timesteps
    check_sampler_args(sampler, steps, eta, clip_limit, spacing, T)
    num_steps = len(plan_timesteps(bundle.schedule, sampler, steps, spacing, T - 1))
    bundle.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)

    network = model_in_precision(bundle.unet, precision, compile=compile)
    if compile:
        logger.info("--compile: the first step compiles the network (about 10 s on a CPU), and again for a last "
                    "batch of another size")
    traced = min(TRAJECTORY_SAMPLES, num_samples, batch_size)  # all from the first batch
    recorder = TrajectoryRecorder(network, set(frame_indices(num_steps)), traced)
    model = InferenceModel(recorder, precision) if trajectory else network  # prepared: `sample` will not wrap it again
    started = time.perf_counter()
    shown: list[torch.Tensor] = []
    written: list[Path] = []
    num_batches = math.ceil(num_samples / batch_size)
    what = f"sample {num_samples} images ({sampler.upper()}-{num_steps}, {num_batches} batch(es))"
    with ProgressReporter(what, num_batches * num_steps, unit="steps") as progress:
        batches = sample_in_batches(
            model, bundle.schedule, num_samples, bundle.latent_shape, batch_size, seed, sampler=sampler, steps=steps,
            eta=eta, clip_limit=clip_limit, spacing=spacing, device=device, precision=precision,
            callback=counting_steps(progress, recorder.callback if trajectory else None),
        )
        for z in batches:
            recorder.active = False  # only the first batch is traced
            images = bundle.vae.decode(z).cpu()
            written += save_images(images, out_dir / "images", start_index=len(written))
            if sum(len(s) for s in shown) < GRID_MAX:
                shown.append(images[: GRID_MAX - sum(len(s) for s in shown)])
    seconds = time.perf_counter() - started
    grid_images = torch.cat(shown)
    label = f"{sampler.upper()}-{num_steps}" + (f", clip {clip_limit}" if clip_limit else "") + f", seed {seed}"
    grid = save_grid(grid_images, out_dir / "grid.png", ncols=math.ceil(math.sqrt(len(grid_images))), title=label)
    write_sample_record(out_dir / SAMPLE_RECORD, checkpoint, sampler, num_steps, seed, precision)
    if not trajectory:
        return SampleReport(out_dir, grid, written, None, num_steps, seconds)
    decoded = recorder.decode(bundle.vae)
    trajectory_png = save_trajectory_grid(decoded, out_dir / "trajectory.png",
                                          f"reverse process, {label}: model input z_t and predicted clean z0")
    trajectory_gif = save_trajectory_gif(decoded, out_dir / "trajectory.gif")
    return SampleReport(out_dir, grid, written, trajectory_png, num_steps, seconds, trajectory_gif)
