"""Experiment tracking through Accelerate's trackers: TensorBoard or Weights & Biases.

`[logging] report_to = ["tensorboard"]` (or "wandb", where installed) logs, for every
update, the loss and its parts (reconstruction, KL, β), the learning rate and the
gradient norm, and each preview grid as an image — as diffusers' training scripts do.
TensorBoard writes its event files into RUN/tracking/; it comes with
`pip install "ldm-cli[tensorboard]"`. The trackers start only once the run has proven it
can start, like every other file of a run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from PIL import Image

from ldm_cli.config import RunConfig
from ldm_cli.errors import UsageError
from ldm_cli.training.resume_rules import flatten

TRACKING_DIR = "tracking"
INSTALL = {"tensorboard": 'pip install "ldm-cli[tensorboard]"', "wandb": "pip install wandb"}


def check_trackers(report_to: list[str]) -> None:
    """Refuse (exit 2) a tracker whose package is not installed, before anything runs."""
    for name in report_to:
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"logging.report_to: {name} is not installed; {INSTALL[name]}")


def start_tracking(accelerator: Accelerator, config: RunConfig) -> None:
    if config.logging.report_to:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in flatten(config.model_dump(mode="json")).items()}
        accelerator.init_trackers(config.task_name, config=hparams)


def log_values(accelerator: Accelerator, values: dict[str, float], step: int) -> None:
    if accelerator.trackers:
        accelerator.log(values, step=step)


def log_picture(accelerator: Accelerator, path: Path | None, step: int) -> None:
    """A preview grid (a PNG the task wrote) as an image of every tracker."""
    if not accelerator.trackers or path is None:
        return
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"previews": pixels}, step=step, dataformats="HWC")
        else:
            tracker.log_images({"previews": [pixels]}, step=step)


def end_tracking(accelerator: Accelerator) -> None:
    if accelerator.trackers:
        accelerator.end_training()
