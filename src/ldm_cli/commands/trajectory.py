"""Pictures of the reverse process: z_t (the model's input) and ẑ0 (its prediction) at
evenly spaced steps of a sampling run, recorded while `ldm sample` runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ldm_cli.common.pictures import save_grid
from ldm_cli.modelfiles.bundles import VAEBundle

TRAJECTORY_FRAMES = 10


def frame_indices(num_steps: int, frames: int = TRAJECTORY_FRAMES) -> list[int]:
    """About `frames` step indices from the first to the last step, evenly spaced."""
    if num_steps <= frames:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (frames - 1)) for i in range(frames)})


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

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.active and self.step in self.keep:
            self.timesteps.append(int(t[0]))
            self.z_t.append(z[: self.count].detach().clone())
        return self.model(z, t)

    def callback(self, i: int, t: int, z: torch.Tensor, z0_hat: torch.Tensor) -> None:
        if self.active and self.step in self.keep:
            self.z0_hat.append(z0_hat[: self.count].detach().clone())
        self.step += 1

    def save(self, latents: VAEBundle, path: Path, title: str) -> Path:
        """Grid: for each kept sample a z_t row and a ẑ0 row; a column per kept timestep."""
        frames = len(self.timesteps)
        z_t = latents.decode(torch.cat(self.z_t)).cpu().unflatten(0, (frames, self.count))
        z0 = latents.decode(torch.cat(self.z0_hat)).cpu().unflatten(0, (frames, self.count))
        rows, labels = [], []
        for s in range(self.count):
            rows += [z_t[:, s], z0[:, s]]
            labels += [f"#{s} z_t", f"#{s} pred. z0"]
        return save_grid(torch.cat(rows), path, ncols=frames, row_labels=labels,
                         col_labels=[f"t={t}" for t in self.timesteps], title=title)
