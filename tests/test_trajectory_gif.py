"""`ldm sample --trajectory` also animates the reverse process: trajectory.gif."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ldm_cli.commands import trajectory
from ldm_cli.commands.sample import run_sample
from ldm_cli.errors import UsageError


def frame_durations(gif: Image.Image) -> list[int]:
    durations = []
    for index in range(gif.n_frames):
        gif.seek(index)
        durations.append(gif.info["duration"])
    return durations


def test_trajectory_gif_has_a_frame_per_recorded_step_and_loops(trained_denoiser, tmp_path):
    report = run_sample(trained_denoiser, tmp_path, num_samples=3, batch_size=2, sampler="ddim", steps=20,
                        trajectory=True, device=torch.device("cpu"))
    assert report.trajectory_gif == tmp_path / "trajectory.gif"
    recorded = len(trajectory.frame_indices(20))
    assert recorded == 10
    with Image.open(report.trajectory_gif) as gif:
        assert gif.format == "GIF" and gif.is_animated
        assert gif.n_frames == recorded
        assert gif.info["loop"] == 0  # forever
        width, height = gif.size
        assert width >= 2 * 4 * 16 and height >= 2 * 4 * 16  # 2 samples (z_t above ẑ0), 16-px images × 4
        assert frame_durations(gif) == [trajectory.GIF_FRAME_MS] * (recorded - 1) + [trajectory.GIF_LAST_FRAME_MS]
    assert not list(tmp_path.glob(".*tmp*")), "written atomically, nothing left behind"


def test_trajectory_gif_is_claimed_like_the_png(trained_denoiser, tmp_path):
    (tmp_path / "trajectory.gif").write_bytes(b"earlier")
    with pytest.raises(UsageError, match="trajectory.gif' already exists"):
        run_sample(trained_denoiser, tmp_path, num_samples=1, sampler="ddim", steps=2, trajectory=True,
                   device=torch.device("cpu"))
    assert (tmp_path / "trajectory.gif").read_bytes() == b"earlier"
    report = run_sample(trained_denoiser, tmp_path, num_samples=1, sampler="ddim", steps=2, trajectory=True,
                        device=torch.device("cpu"), overwrite=True)
    with Image.open(report.trajectory_gif) as gif:
        assert gif.n_frames == 2


def test_no_gif_without_trajectory(trained_denoiser, tmp_path):
    report = run_sample(trained_denoiser, tmp_path, num_samples=1, sampler="ddim", steps=2,
                        device=torch.device("cpu"))
    assert report.trajectory_gif is None and not (tmp_path / "trajectory.gif").exists()
