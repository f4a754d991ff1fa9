"""A folder of generated images as `ldm evaluate` reads it: an `ldm sample` output folder
(its images/ subfolder) or any folder of images, all of one size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from ldm_cli.data.decoding import load_image_file
from ldm_cli.data.sources import list_image_files
from ldm_cli.errors import UsageError


def samples_folder(samples: Path) -> Path:
    """The folder of sample images: `samples/images` when given an `ldm sample` output folder."""
    if not samples.exists():
        raise UsageError(f"--samples '{samples}': no such folder")
    if not samples.is_dir():
        raise UsageError(f"--samples '{samples}': not a folder (expected a folder of generated images)")
    nested = samples / "images"
    if nested.is_dir() and list_image_files(nested):
        return nested  # `ldm sample -o DIR` writes DIR/grid.png and DIR/images/000000.png …
    return samples


def sample_files(samples: Path) -> list[Path]:
    """The image files of the samples folder, sorted; at least 2 (a covariance needs them)."""
    folder = samples_folder(samples)
    files = [folder / name for name in list_image_files(folder)]
    if not files:
        raise UsageError(f"--samples '{samples}': holds no images (.png, .jpg, .jpeg, .webp, .bmp)")
    if len(files) < 2:
        raise UsageError(f"--samples '{samples}': holds {len(files)} image; at least 2 are needed")
    return files


def sample_resolution(path: Path) -> int:
    """The side of the first sample (the short side, as data preparation crops to a square)."""
    try:
        with Image.open(path) as image:
            side = min(image.size)
    except Exception as err:  # PIL raises many types for a file that is not an image
        raise UsageError(f"sample '{path}': not a usable image ({err})") from None
    if not 8 <= side <= 4096:
        raise UsageError(f"sample '{path}': {side}px; evaluate needs images of 8 to 4096 pixels")
    return side


def sample_batches(files: list[Path], resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 `(B, 3, R, R)` batches of the sample files, decoded as data sets are."""
    for start in range(0, len(files), batch_size):
        yield torch.stack([load_image_file(f, resolution) for f in files[start:start + batch_size]])
