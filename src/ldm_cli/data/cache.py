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

Files that cannot be decoded are skipped, counted and reported in one warning; a
source with no usable image is a `DataError` (exit code 2).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_cli.common.files import atomic_write
from ldm_cli.config import DataConfig
from ldm_cli.data import faces
from ldm_cli.data.decoding import decode_all
from ldm_cli.data.sources import BUILTIN_PREFIX, Source, resolve_source
from ldm_cli.errors import DataError

logger = logging.getLogger("ldm")

CACHE_FORMAT = 1  # bump whenever preprocessing changes, so old caches are not reused
SPLIT_STREAM = 0x5917  # keeps the split's random stream apart from the faces' streams
MAX_EXAMPLES = 3  # skipped files named in the warning


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
    """Write `rows[order]` as a .npy at `path`, in chunks, via a temporary file and a rename."""
    with atomic_write(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(order), *rows.shape[1:]))
        for start in range(0, len(order), 1024):
            out[start:start + 1024] = rows[order[start:start + 1024]]
        out.flush()
        del out


def write_index_atomically(path: Path, index: CacheIndex) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(asdict(index), indent=1), encoding="utf-8")


def read_cache(index_path: Path, resolution: int) -> tuple[CacheIndex, np.ndarray] | None:
    """The index and memory-mapped images of a complete, consistent cache; None otherwise."""
    try:
        index = CacheIndex(**json.loads(index_path.read_text(encoding="utf-8")))
        images = np.load(index_path.parent / index.images, mmap_mode="r")
    except (OSError, ValueError, TypeError):
        return None
    if index.format != CACHE_FORMAT or images.shape != (index.count, 3, resolution, resolution):
        return None
    return index, images


@contextmanager
def scratch_array(directory: Path, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """A uint8 array backed by a temporary file in `directory`, deleted afterwards."""
    path = directory / f".scratch-{os.getpid()}-{time.monotonic_ns()}.npy"
    try:
        yield np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    finally:
        path.unlink(missing_ok=True)


def build_cache(source: Source, cfg: DataConfig, index_path: Path) -> None:
    """Decode (or draw) the whole source once and write it in split order."""
    res, directory = cfg.resolution, index_path.parent
    if source.kind == "builtin":
        logger.info("drawing %d faces at %dpx into %s", cfg.builtin_size, res, directory)
        rows = faces.draw_faces(cfg.builtin_size, res, cfg.seed).transpose(0, 3, 1, 2)
        write_split_cache(source, cfg, index_path, rows, found=len(rows), failures={})
        return
    logger.info("decoding %d images of %s into %s", len(source.members), source.text, directory)
    with scratch_array(directory, (len(source.members), 3, res, res)) as rows:
        failures = decode_all(source, res, rows)
        write_split_cache(source, cfg, index_path, rows, found=len(source.members), failures=failures)


def write_split_cache(
    source: Source, cfg: DataConfig, index_path: Path, rows: np.ndarray, found: int, failures: dict[int, str]
) -> None:
    """Store the usable `rows` as training rows then held-out rows, then the index."""
    usable = np.array([i for i in range(found) if i not in failures], dtype=np.int64)
    if len(usable) == 0:
        example = ", ".join(f"{source.members[i]}: {r}" for i, r in list(failures.items())[:1])
        raise DataError(
            f"data source {source.text!r}: no usable image "
            f"(found {found} files, {len(failures)} could not be decoded, e.g. {example})"
        )
    order = usable[split_order(len(usable), cfg.holdout_fraction, cfg.seed)]
    images = images_file_name(index_path.stem, cfg.holdout_fraction, cfg.seed)
    write_cache_atomically(index_path.parent / images, rows, order)
    index = CacheIndex(
        format=CACHE_FORMAT,
        source=source.text,
        resolution=cfg.resolution,
        found=found,
        count=len(usable),
        holdout=holdout_size(len(usable), cfg.holdout_fraction),
        holdout_fraction=cfg.holdout_fraction,
        seed=cfg.seed,
        skipped=[[source.members[i], reason] for i, reason in failures.items()],
        images=images,
    )
    write_index_atomically(index_path, index)


def resplit_cache(index: CacheIndex, images: np.ndarray, cfg: DataConfig, index_path: Path) -> None:
    """Rewrite a cache in the order of a new split (another holdout fraction or seed); no decoding."""
    logger.info("re-splitting cached images for holdout_fraction=%g, seed=%d", cfg.holdout_fraction, cfg.seed)
    old_order = split_order(index.count, index.holdout_fraction, index.seed)
    row_of = np.empty_like(old_order)
    row_of[old_order] = np.arange(index.count)  # image index -> row in the current file
    name = images_file_name(index_path.stem, cfg.holdout_fraction, cfg.seed)
    new_order = split_order(index.count, cfg.holdout_fraction, cfg.seed)
    write_cache_atomically(index_path.parent / name, images, row_of[new_order])
    new = CacheIndex(
        **{
            **asdict(index),
            "holdout": holdout_size(index.count, cfg.holdout_fraction),
            "holdout_fraction": cfg.holdout_fraction,
            "seed": cfg.seed,
            "images": name,
        }
    )
    write_index_atomically(index_path, new)
    if name != index.images:
        (index_path.parent / index.images).unlink(missing_ok=True)


def make_cache_dir(cfg: DataConfig) -> Path:
    directory = cache_dir_for(cfg)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cache folder '{directory}': cannot be created ({err.strerror}); "
            "set data.cache_dir or LDM_CACHE_DIR"
        ) from None
    return directory


def report_skipped(index: CacheIndex) -> None:
    """One warning naming how many files were skipped, with a few examples and reasons."""
    if not index.skipped:
        return
    examples = "; ".join(f"{name}: {reason}" for name, reason in index.skipped[:MAX_EXAMPLES])
    more = ", …" if len(index.skipped) > MAX_EXAMPLES else ""
    logger.warning(
        "data source %r: skipped %d of %d files that could not be decoded (%s%s)",
        index.source, len(index.skipped), index.found, examples, more,
    )


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor over a read-only memory map (torch warns about read-only arrays)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(images)


def load_images(cfg: DataConfig) -> ImageSet:
    """The prepared, split image set of `cfg.source`, decoding only when no cache matches."""
    source = resolve_source(cfg)
    index_path = make_cache_dir(cfg) / f"{cache_stem(source, cfg.resolution)}.json"
    cached = read_cache(index_path, cfg.resolution)
    if cached is None or cached[0].split != (cfg.holdout_fraction, cfg.seed):
        if cached is None:
            build_cache(source, cfg, index_path)
        else:
            resplit_cache(*cached, cfg, index_path)
        cached = read_cache(index_path, cfg.resolution)
        if cached is None:  # only if another process replaced the cache meanwhile
            raise DataError(f"cache '{index_path}': changed while being written; run again")
    index, images = cached
    report_skipped(index)
    tensor = as_tensor(images)
    n_train = index.count - index.holdout
    return ImageSet(tensor[:n_train], tensor[n_train:], source=source.text, skipped=len(index.skipped))
