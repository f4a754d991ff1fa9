"""Pictures of the reverse process: z_t (the model's input) and ẑ0 (its prediction) at
evenly spaced steps of a sampling run, recorded while `ldm sample` runs — drawn as a
grid (trajectory.png) and as an animation (trajectory.gif)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm_cli.common.device import is_self_conditioned
from ldm_cli.common.files import atomic_write
from ldm_cli.common.pictures import image_grid, save_grid
from ldm_cli.modelfiles.bundles import VAEBundle

TRAJECTORY_FRAMES = 10
GIF_SCALE = 4  # nearest-neighbour upscaling of each image, so 32-px images are visible
GIF_FRAME_MS = 300
GIF_LAST_FRAME_MS = 2000  # the result stays on screen before the animation loops


def frame_indices(num_steps: int, frames: int = TRAJECTORY_FRAMES) -> list[int]:
    """About `frames` step indices from the first to the last step, evenly spaced."""
    if num_steps <= frames:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (frames - 1)) for i in range(frames)})


@dataclass
class Trajectory:
    """Decoded images of the traced samples at the recorded steps."""

    timesteps: list[int]
    z_t: torch.Tensor  # (steps, samples, 3, H, W) in [-1, 1]: the model's input
    z0_hat: torch.Tensor  # (steps, samples, 3, H, W): its predicted clean image


class TrajectoryRecorder:
    """Keeps z_t (the model's input) and ẑ0 (its prediction) at chosen steps of one run.

    Wrap the model with it and pass `callback` to the sampler; set `active = False`
    once the samples to trace have gone through.
    """

    def __init__(self, model: Callable, keep: set[int], count: int):
        self.model, self.keep, self.count = model, keep, count
        self.step = 0
        self.timesteps: list[int] = []
        self.z_t: list[torch.Tensor] = []
        self.z0_hat: list[torch.Tensor] = []
        self.active = True

    @property
    def self_conditioned(self) -> bool:
        return is_self_conditioned(self.model)

    def __call__(self, z: torch.Tensor, t: torch.Tensor, *estimate: torch.Tensor) -> torch.Tensor:
        if self.active and self.step in self.keep:
            self.timesteps.append(int(t[0]))
            self.z_t.append(z[: self.count].detach().clone())
        return self.model(z, t, *estimate)

    def callback(self, i: int, t: int, z: torch.Tensor, z0_hat: torch.Tensor) -> None:
        if self.active and self.step in self.keep:
            self.z0_hat.append(z0_hat[: self.count].detach().clone())
        self.step += 1

    def decode(self, latents: VAEBundle) -> Trajectory:
        """The recorded latents decoded to images."""
        steps = len(self.timesteps)
        z_t = latents.decode(torch.cat(self.z_t)).cpu().unflatten(0, (steps, self.count))
        z0_hat = latents.decode(torch.cat(self.z0_hat)).cpu().unflatten(0, (steps, self.count))
        return Trajectory(list(self.timesteps), z_t, z0_hat)


def save_trajectory_grid(trajectory: Trajectory, path: Path, title: str) -> Path:
    """Grid: for each traced sample a z_t row and a ẑ0 row; a column per recorded timestep."""
    rows, labels = [], []
    for s in range(trajectory.z_t.shape[1]):
        rows += [trajectory.z_t[:, s], trajectory.z0_hat[:, s]]
        labels += [f"#{s} z_t", f"#{s} pred. z0"]
    return save_grid(torch.cat(rows), path, ncols=len(trajectory.timesteps), row_labels=labels,
                     col_labels=[f"t={t}" for t in trajectory.timesteps], title=title)


def animation_frames(trajectory: Trajectory, scale: int = GIF_SCALE) -> list[Image.Image]:
    """One picture per recorded step: the traced samples' z_t above their ẑ0, upscaled `scale`×."""
    count, size = trajectory.z_t.shape[1], trajectory.z_t.shape[-1]
    return [
        image_grid(torch.cat((z_t, z0_hat)), ncols=count, row_labels=["z_t", "pred. z0"], title=f"t = {t}",
                   min_cell=scale * size)
        for t, z_t, z0_hat in zip(trajectory.timesteps, trajectory.z_t, trajectory.z0_hat)
    ]


def save_gif(frames: list[Image.Image], path: Path, frame_ms: int = GIF_FRAME_MS,
             last_frame_ms: int = GIF_LAST_FRAME_MS) -> Path:
    """An animated GIF that loops forever, holding the last frame longer; written atomically."""
    durations = [frame_ms] * (len(frames) - 1) + [last_frame_ms]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


def save_trajectory_gif(trajectory: Trajectory, path: Path) -> Path:
    """The reverse process as an animation: a frame per recorded step (z_t and ẑ0 of each traced sample)."""
    return save_gif(animation_frames(trajectory), path)
