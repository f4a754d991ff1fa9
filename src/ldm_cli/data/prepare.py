"""Preparing a data set: decode (or draw) it once into the uint8 cache, in split order,
and load it from there — `load_images`, what training calls (the cache's layout is
described in `ldm_cli.data.cache`)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ldm_cli.common.progress import ProgressReporter
from ldm_cli.config import DataConfig
from ldm_cli.data import faces
from ldm_cli.data.cache import (
    CACHE_FORMAT,
    MAX_EXAMPLES,
    CacheIndex,
    ImageSet,
    cache_dir_for,
    cache_stem,
    check_free_space,
    full_disk_is_an_error,
    holdout_size,
    images_file_name,
    read_cache,
    scratch_array,
    split_order,
    write_cache_atomically,
    write_index_atomically,
)
from ldm_cli.data.cache_folder import folder_clock, mark_used, prune_superseded
from ldm_cli.data.decoding import decode_all
from ldm_cli.data.sources import Source, describe_ignored, resolve_source
from ldm_cli.errors import DataError

logger = logging.getLogger("ldm")


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
            with ProgressReporter("draw faces", cfg.builtin_size, unit="faces") as progress:
                rows = faces.draw_faces(cfg.builtin_size, res, cfg.seed, on_face=progress.advance)
            rows = rows.transpose(0, 3, 1, 2)
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
