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
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_cli.common.files import atomic_write, format_bytes
from ldm_cli.config import DataConfig
from ldm_cli.data import faces
from ldm_cli.data.decoding import decode_all
from ldm_cli.data.sources import BUILTIN_PREFIX, Source, describe_ignored, resolve_source
from ldm_cli.errors import DataError, DiskFullError

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


# --------------------------------------------------------------------------- the cache folder's entries


def folder_clock(directory: Path) -> int:
    """Now, in ns, by the clock that stamps files in `directory`: the mtime a new file gets.

    Stamps made by other processes (`mark_used`) are compared with this, never with
    `time.time()`, which can differ by milliseconds (coarse kernel clocks) or by seconds
    (a network disk stamps files with its server's clock).
    """
    with tempfile.TemporaryFile(dir=directory) as probe:
        return os.fstat(probe.fileno()).st_mtime_ns


def mark_used(index_path: Path) -> None:
    """Stamp the index's mtime with now: the entry's "last used" time, which keeps it from
    being pruned while in use. Only a hint: a read-only cache folder is fine."""
    try:
        os.utime(index_path)
    except OSError:
        pass


def scan_cache_folder(directory: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """The files in `directory` as ({entry stem: its files, index first}, leftovers of killed writes).

    Only regular files are looked at; anything else (a file of another program, a folder) is in neither.
    """
    try:
        names = sorted(e.name for e in os.scandir(directory) if e.is_file(follow_symlinks=False))
    except OSError:
        return {}, []
    entries: dict[str, list[Path]] = {}
    leftovers = []
    for name in names:
        if LEFTOVER.fullmatch(name):
            leftovers.append(directory / name)
        elif match := ENTRY_FILE.fullmatch(name):
            entries.setdefault(match["stem"], []).append(directory / name)
    for stem, files in entries.items():
        files.sort(key=lambda path: path.name != f"{stem}.json")
    return entries, leftovers


def remove_files(paths: list[Path]) -> list[Path]:
    """Delete `paths` in order (an index first, so no reader finds it without its images); the ones removed."""
    removed = []
    for path in paths:
        try:
            path.unlink()
        except OSError:  # gone already, or held open where that forbids removal
            continue
        removed.append(path)
    return removed


def prune_superseded(index_path: Path, source: Source, started_ns: int) -> None:
    """Remove the cache entries the new one at `index_path` supersedes: the same folder or
    zip (by resolved path) at the same resolution, under another key.

    Conservative: never a builtin's (another size or seed is another set, not an old
    one), never an entry whose index does not name its origin, and never one used or
    written since this build began at `started_ns` (another process may be reading it).
    """
    if source.kind == "builtin":
        return
    new = ENTRY_FILE.fullmatch(index_path.name)
    entries = scan_cache_folder(index_path.parent)[0]
    for stem, files in entries.items():
        old = ENTRY_FILE.fullmatch(f"{stem}.json")
        if stem == new["stem"] or (old["name"], old["resolution"]) != (new["name"], new["resolution"]):
            continue
        old_index = index_path.parent / f"{stem}.json"
        try:
            if old_index.stat().st_mtime_ns >= started_ns:
                continue
        except OSError:  # no index: being written, or a leftover for `ldm cache --prune`
            continue
        index = read_index(old_index)
        if index is not None and index.origin == source.origin:
            removed = remove_files(files)
            logger.info("removed the superseded cache %s (%d files)", stem, len(removed))


# --------------------------------------------------------------------------- building


def build_cache(source: Source, cfg: DataConfig, index_path: Path) -> None:
    """Decode (or draw) the whole source once, write it in split order, and remove the
    caches it supersedes. Free space is checked first; a full disk is one `DiskFullError` line."""
    res, directory = cfg.resolution, index_path.parent
    row_bytes = 3 * res * res
    if source.kind == "builtin":
        size = cfg.builtin_size * row_bytes
        check_free_space(directory, size)
        logger.info("drawing %d faces at %dpx into %s", cfg.builtin_size, res, directory)
        with full_disk_is_an_error(directory, size):
            rows = faces.draw_faces(cfg.builtin_size, res, cfg.seed).transpose(0, 3, 1, 2)
            write_split_cache(source, cfg, index_path, rows, found=len(rows), failures={})
        return
    count = len(source.members)
    size = 2 * count * row_bytes  # the scratch rows and the cache file exist together
    check_free_space(directory, size)
    logger.info("decoding %d images of %s into %s", count, source.text, directory)
    with full_disk_is_an_error(directory, size):
        started = folder_clock(directory)
        with scratch_array(directory, (count, 3, res, res)) as rows:
            failures = decode_all(source, res, rows)
            write_split_cache(source, cfg, index_path, rows, found=count, failures=failures)
    prune_superseded(index_path, source, started)


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
        origin=source.origin,
    )
    write_index_atomically(index_path, index)


def resplit_cache(index: CacheIndex, images: np.ndarray, cfg: DataConfig, index_path: Path) -> None:
    """Rewrite a cache in the order of a new split (another holdout fraction or seed); no decoding."""
    directory, size = index_path.parent, images.nbytes
    check_free_space(directory, size)
    logger.info("re-splitting cached images for holdout_fraction=%g, seed=%d", cfg.holdout_fraction, cfg.seed)
    old_order = split_order(index.count, index.holdout_fraction, index.seed)
    row_of = np.empty_like(old_order)
    row_of[old_order] = np.arange(index.count)  # image index -> row in the current file
    name = images_file_name(index_path.stem, cfg.holdout_fraction, cfg.seed)
    new_order = split_order(index.count, cfg.holdout_fraction, cfg.seed)
    new = CacheIndex(
        **{
            **asdict(index),
            "holdout": holdout_size(index.count, cfg.holdout_fraction),
            "holdout_fraction": cfg.holdout_fraction,
            "seed": cfg.seed,
            "images": name,
        }
    )
    with full_disk_is_an_error(directory, size):
        write_cache_atomically(directory / name, images, row_of[new_order])
        write_index_atomically(index_path, new)
    if name != index.images:
        (directory / index.images).unlink(missing_ok=True)


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
        "data source %r: skipped %d of %d files that could not be read or decoded (%s%s)",
        index.source, len(index.skipped), index.found, examples, more,
    )


def report_ignored(source: Source) -> None:
    """One warning counting the files not even tried, for their extension."""
    if source.ignored:
        logger.warning("data source %r: %s", source.text, describe_ignored(source.ignored))


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor over a read-only memory map (torch warns about read-only arrays)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(images)


def load_images(cfg: DataConfig) -> ImageSet:
    """The prepared, split image set of `cfg.source`, decoding only when no cache matches."""
    source = resolve_source(cfg)
    report_ignored(source)
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
    mark_used(index_path)
    index, images = cached
    report_skipped(index)
    tensor = as_tensor(images)
    n_train = index.count - index.holdout
    return ImageSet(tensor[:n_train], tensor[n_train:], source=source.text, skipped=len(index.skipped))
