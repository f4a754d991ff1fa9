"""The uint8 image cache and the held-out split: `load_images`.

A data source (`DataConfig.source`) is a folder of images (searched recursively), a
.zip of images, or `builtin:faces` (drawn by `ldm_cli.data.faces`; see `ldm_cli.data.sources`). Every image becomes RGB
at `resolution`×`resolution`: EXIF orientation applied, transparency composited on
white, 16-bit values scaled to 8 bits, the short side resized with Lanczos and the
centre cropped to a square.

Decoding happens once. The prepared set is stored as uint8 in the cache folder:

    <name>-<res>px-<key>.json                 the index: counts, skipped files, split
    <name>-<res>px-<key>-h<frac>-s<seed>.npy  uint8 (N, 3, H, W), training rows first,
                                              then the held-out rows

`key` hashes what the pixels depend on (the source, the resolution, the builtin's size
and seed, the file list with sizes and mtimes), so any change there makes a new cache.
Files are written beside their final name and renamed; the JSON index is written last,
so it only ever names a complete .npy. Storing the rows in split order is what lets
`ImageSet.train` and `ImageSet.holdout` be zero-copy slices of one memory-mapped file;
changing the split later rewrites the rows in the new order without decoding again.

A cache hit stamps the index's mtime (its "last used" time). Building a folder's or a
zip's cache under a new key removes the entries it supersedes: the same source (by
resolved path) at the same resolution, not used since the build began
(`prune_superseded`); `ldm_cli.commands.cache` lists and prunes the rest.

Free space is checked before anything is written, and the disk blocks of the
memory-mapped scratch file are allocated up front, so a full disk is one `LdmError`
line (`DiskFullError`, exit code 1) rather than a SIGBUS; temporary files are removed
either way.

Files that cannot be read or decoded are skipped, counted and reported in one warning;
files ignored for their extension get one line too; a source with no usable image is
a `DataError` (exit code 2).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_cli.common.files import atomic_write, format_bytes
from ldm_cli.config import DataConfig
from ldm_cli.data.sources import BUILTIN_PREFIX, Source
from ldm_cli.errors import DiskFullError

logger = logging.getLogger("ldm")

CACHE_FORMAT = 1  # bump whenever preprocessing changes, so old caches are not reused
SPLIT_STREAM = 0x5917  # keeps the split's random stream apart from the faces' streams
MAX_EXAMPLES = 3  # skipped files named in the warning
SPACE_HEADROOM = 16 * 2**20  # beyond the pixels: the index, the .npy header, the file system's own blocks
BIGGER_DISK = "set data.cache_dir or LDM_CACHE_DIR to a folder on a bigger disk"

# The files of one cache entry: <name>-<res>px-<key>.json, and <name>-<res>px-<key>-… beside it
# (the .npy images; `ldm evaluate`'s -fidstats-….safetensors).
ENTRY_FILE = re.compile(r"(?P<stem>(?P<name>.+)-(?P<resolution>\d+)px-(?P<key>[0-9a-f]{16}))(?:\.json|-.+)")
# What a killed write leaves: scratch arrays and `atomic_write`'s temporary siblings.
LEFTOVER = re.compile(r"\.scratch-\d+-\d+\.npy|\..+\.tmp-\d+|\.tmp-.+")


@dataclass(frozen=True)
class ImageSet:
    """A prepared image set, split into training and held-out images.

    Both tensors are read-only views of the memory-mapped cache: index them to get a
    batch (a copy), and never write into them in place.
    """

    train: torch.Tensor  # uint8 (N, 3, H, W)
    holdout: torch.Tensor  # uint8 (M, 3, H, W), never trained on
    source: str
    skipped: int  # files that could not be decoded

    def __len__(self) -> int:
        return len(self.train)


# --------------------------------------------------------------------------- split


def holdout_size(n: int, fraction: float) -> int:
    """round(fraction·n), at least 1 when fraction > 0 and n ≥ 2, leaving at least one to train on."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(fraction * n)))


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, holdout) indices of `n` images: the first k of a seeded permutation are held out."""
    permutation = np.random.default_rng([SPLIT_STREAM, seed % 2**64]).permutation(n)
    k = holdout_size(n, fraction)
    return np.sort(permutation[k:]), np.sort(permutation[:k])


def split_order(n: int, fraction: float, seed: int) -> np.ndarray:
    """Image indices in the order the cache stores them: training images, then held-out ones."""
    return np.concatenate(split_indices(n, fraction, seed))


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CacheIndex:
    """The JSON beside a cached image file: what it holds and how it is split."""

    format: int
    source: str
    resolution: int
    found: int  # candidate files (or drawn images)
    count: int  # usable images stored
    holdout: int  # the last `holdout` rows are held out
    holdout_fraction: float
    seed: int
    skipped: list[list[str]]  # [name, reason] of every file that could not be decoded
    images: str  # file name of the .npy beside the index
    origin: str = ""  # `Source.origin`: the resolved path or builtin:NAME ("" in indexes older than it)

    @property
    def split(self) -> tuple[float, int]:
        return (self.holdout_fraction, self.seed)


def cache_dir_for(cfg: DataConfig) -> Path:
    """`cfg.cache_dir`, else `$LDM_CACHE_DIR`, else `~/.cache/ldm` (not created here)."""
    chosen = cfg.cache_dir or os.environ.get("LDM_CACHE_DIR") or Path.home() / ".cache" / "ldm"
    return Path(chosen).expanduser()


def cache_key(source: Source, resolution: int) -> str:
    """A short hash of everything the cached pixels depend on."""
    identity = {"format": CACHE_FORMAT, "resolution": resolution, **source.identity}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cache_stem(source: Source, resolution: int) -> str:
    """A readable cache file prefix, e.g. `faces-32px-<key>` or `ffhq-256px-<key>`."""
    name = source.path.stem if source.path is not None else source.text[len(BUILTIN_PREFIX):]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "data"
    return f"{name}-{resolution}px-{cache_key(source, resolution)}"


def images_file_name(stem: str, fraction: float, seed: int) -> str:
    return f"{stem}-h{fraction:g}-s{seed}.npy"


def write_cache_atomically(path: Path, rows: np.ndarray, order: np.ndarray) -> None:
    """Write `rows[order]` as a .npy at `path`, in chunks, via a temporary file and a rename.

    Plain writes rather than a memory map: a full disk is then an ENOSPC error, not a SIGBUS.
    """
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(order), *rows.shape[1:])}
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        chunks = (order[start:start + 1024] for start in range(0, len(order), 1024))
        f.writelines(np.ascontiguousarray(rows[chunk], dtype=np.uint8) for chunk in chunks)


def write_index_atomically(path: Path, index: CacheIndex) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(asdict(index), indent=1), encoding="utf-8")


def read_index(index_path: Path) -> CacheIndex | None:
    """The index at `index_path`; None when it is missing or not a valid index."""
    try:
        return CacheIndex(**json.loads(index_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def read_cache(index_path: Path, resolution: int) -> tuple[CacheIndex, np.ndarray] | None:
    """The index and memory-mapped images of a complete, consistent cache; None otherwise."""
    index = read_index(index_path)
    if index is None:
        return None
    try:
        images = np.load(index_path.parent / index.images, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if index.format != CACHE_FORMAT or images.shape != (index.count, 3, resolution, resolution):
        return None
    return index, images


# --------------------------------------------------------------------------- disk space


def space_error(directory: Path, problem: str, needed: int, free: int) -> DiskFullError:
    return DiskFullError(
        f"cache folder '{directory}': {problem} (needs {format_bytes(needed)}, {format_bytes(free)} free); "
        f"{BIGGER_DISK}"
    )


def check_free_space(directory: Path, size: int) -> None:
    """One `DiskFullError` line (exit 1) unless `size` bytes, plus headroom, fit in `directory` now."""
    needed, free = size + SPACE_HEADROOM, shutil.disk_usage(directory).free
    if free < needed:
        raise space_error(directory, "not enough free space for the image cache", needed, free)


@contextmanager
def full_disk_is_an_error(directory: Path, size: int) -> Iterator[None]:
    """Turn a full disk (ENOSPC, or a full quota: EDQUOT) while writing `size` bytes into
    `directory` into one `DiskFullError` line about the cache, with the way out; the
    writes inside remove their temporary files on the way here."""
    try:
        yield
    except (OSError, DiskFullError) as err:  # atomic_write reports a full disk as DiskFullError itself
        if isinstance(err, OSError) and err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(directory).free
        raise space_error(directory, "disk full while writing the image cache", size + SPACE_HEADROOM, free) from None


def reserve_blocks(path: Path) -> None:
    """Allocate every disk block of the (sparse) file at `path` now.

    A write through a memory map into a block the disk has no room for kills the process
    with SIGBUS; allocated up front, a full disk is an ENOSPC error here instead. A file
    system that cannot allocate ahead is left to `check_free_space`.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fallocate") and size > 0:
            os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


@contextmanager
def scratch_array(directory: Path, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """A uint8 array backed by a temporary file in `directory` (its blocks reserved), deleted afterwards."""
    path = directory / f".scratch-{os.getpid()}-{time.monotonic_ns()}.npy"
    try:
        rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        reserve_blocks(path)
        yield rows
    finally:
        path.unlink(missing_ok=True)
