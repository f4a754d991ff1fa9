"""Decoding: any image file as RGB uint8 at the training resolution.

Every image is EXIF-oriented, converted to RGB (transparency composited on white,
16-bit values scaled to 8 bits), its short side resized with Lanczos and its centre
cropped to a square. Files that are not usable images raise `UndecodableImage` with a
short reason; `decode_all` collects those reasons, and those of files skipped unread
(`ldm_cli.data.sources.UnreadableFile`: a FIFO, a device, a file over the size limit),
instead of stopping.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm_cli.common.progress import ProgressReporter
from ldm_cli.data.sources import Source, UnreadableFile, member_reader, read_regular_file
from ldm_cli.errors import DataError

logger = logging.getLogger("ldm")

HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def high_bit_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit (or 32-bit integer) grayscale image as uint8, mapping 0..65535 to 0..255."""
    values = np.asarray(image).astype(np.float64)
    return np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency composited on white, 16 bits scaled down.

    PIL's own `convert("RGB")` clips 16-bit values instead of scaling them and drops
    alpha onto black, so those cases are handled here.
    """
    if image.mode in HIGH_BIT_DEPTH_MODES:
        return Image.fromarray(high_bit_depth_to_uint8(image)).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def center_square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the short side is `resolution` and crop the centre square, in one pass."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize(
        (resolution, resolution),
        Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,  # shrink huge images by whole factors first; visually identical
    )


def preprocess(image: Image.Image, resolution: int) -> np.ndarray:
    """EXIF-orient, convert to RGB, resize and centre-crop: uint8 `(resolution, resolution, 3)`."""
    image = ImageOps.exif_transpose(image)
    return np.asarray(center_square(to_rgb(image), resolution))


# --------------------------------------------------------------------------- decoding


class UndecodableImage(Exception):
    """One file that is not a usable image; `reason` is a short phrase for the warning."""

    def __init__(self, reason: str):
        self.reason = " ".join(reason.split())  # one line, whatever the decoder said
        super().__init__(self.reason)


@contextmanager
def bombs_are_errors() -> Iterator[None]:
    """Turn PIL's DecompressionBombWarning into an error while decoding.

    Warning filters are process-wide (Python < 3.14), so this wraps a whole decoding
    pass from the calling thread rather than each image in a worker thread.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Decode and preprocess one encoded image: uint8 `(resolution, resolution, 3)`.

    Raises `UndecodableImage` for anything that is not a usable image: not an image,
    truncated, or larger than `Image.MAX_IMAGE_PIXELS` (a decompression bomb).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and image.width * image.height > limit:
                raise Image.DecompressionBombError("")  # reported like PIL's own check, below
            image.draft("RGB", (2 * resolution, 2 * resolution))  # JPEG: decode at a reduced scale
            return preprocess(image, resolution)
    except UnidentifiedImageError:
        raise UndecodableImage("not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UndecodableImage(f"too many pixels, over {Image.MAX_IMAGE_PIXELS} (decompression bomb)") from None
    except Exception as err:  # PIL raises many types for corrupt files; none may stop a load
        raise UndecodableImage(str(err) or type(err).__name__) from None


def decode_or_reason(data: bytes, resolution: int) -> np.ndarray | str:
    """`decode_image`, with a failure returned as its reason instead of raised."""
    try:
        return decode_image(data, resolution)
    except UndecodableImage as err:
        return err.reason


def decode_workers() -> int:
    """Threads for decoding: PIL releases the GIL while it decodes and resizes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, 32))


def decode_all(source: Source, resolution: int, out: np.ndarray) -> dict[int, str]:
    """Decode every member of `source` into `out[i]` (3, H, W); return {index: reason} of failures."""
    failures: dict[int, str] = {}
    workers = decode_workers()
    chunk = 8 * workers
    total = len(source.members)
    progress = ProgressReporter(f"decode {source.text}", total, unit="images")
    with bombs_are_errors(), ThreadPoolExecutor(workers) as pool, member_reader(source) as read, progress:
        for start in range(0, total, chunk):
            blobs: dict[int, bytes] = {}  # read on this thread, decoded on the pool
            for i, name in enumerate(source.members[start:start + chunk], start):
                try:
                    blobs[i] = read(name)
                except UnreadableFile as err:  # a FIFO, a device, too large: skipped unread
                    failures[i] = err.reason
                except Exception as err:  # unreadable file, bad zip member: skipped like a bad image
                    failures[i] = f"cannot be read ({err})"
            results = pool.map(decode_or_reason, blobs.values(), repeat(resolution))
            for i, result in zip(blobs, results):
                if isinstance(result, str):
                    failures[i] = result
                else:
                    out[i] = result.transpose(2, 0, 1)
            progress.advance(by=min(chunk, total - start))
    return failures


def load_image_file(path: str | Path, resolution: int) -> torch.Tensor:
    """One image file, preprocessed like a data set: uint8 `(3, resolution, resolution)`.

    Read like a data set's files: a regular file (or a symlink to one) of at most
    `MAX_IMAGE_BYTES`; anything else is a one-line `DataError` naming what it is.
    """
    path = Path(path)
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        raise DataError(f"image '{path}': no such file") from None
    except UnreadableFile as err:
        raise DataError(f"image '{path}': {err.reason}") from None
    except OSError as err:
        raise DataError(f"image '{path}': cannot be read ({err.strerror or err})") from None
    try:
        with bombs_are_errors():
            array = decode_image(data, resolution)
    except UndecodableImage as err:
        raise DataError(f"image '{path}': not a usable image ({err.reason})") from None
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
