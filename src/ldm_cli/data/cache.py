"""Image sources, preprocessing, the uint8 cache and the held-out split.

A data source (`DataConfig.source`) is a folder of images (searched recursively), a
.zip of images, or `builtin:faces` (drawn by `ldm_cli.faces`). Every image becomes RGB
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
import io
import json
import logging
import os
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm_cli import faces
from ldm_cli.config import DataConfig
from ldm_cli.errors import DataError

logger = logging.getLogger("ldm")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("faces",)
EXPECTED_SOURCE = "expected an image folder, a .zip of images, or builtin:faces"
CACHE_FORMAT = 1  # bump whenever preprocessing changes, so old caches are not reused
SPLIT_STREAM = 0x5917  # keeps the split's random stream apart from the faces' streams
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
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


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A data source resolved from the config: what to read and what identifies it."""

    text: str  # as the user wrote it, for messages
    kind: str  # "folder", "zip" or "builtin"
    path: Path | None  # resolved absolute path; None for a builtin
    members: tuple[str, ...]  # image files relative to the folder, or zip member names
    identity: dict  # everything the cached pixels depend on, hashed into the cache key


def is_image_name(name: str) -> bool:
    """An image extension (any case), and no hidden or macOS resource-fork part."""
    parts = name.split("/")
    if any(part.startswith(".") or part == "__MACOSX" for part in parts):
        return False
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(folder: Path) -> list[str]:
    """Image files under `folder`, recursively, as sorted relative POSIX paths."""
    names = []
    for root, _dirs, files in os.walk(folder):
        relative = Path(root).relative_to(folder)
        names += [(relative / f).as_posix() for f in files]
    return sorted(name for name in names if is_image_name(name))


def read_zip_members(path: Path) -> list[str]:
    """Image members of the zip archive at `path`, sorted."""
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
    return sorted(name for name in names if is_image_name(name))


def size_and_mtime(path: Path) -> tuple[int, int]:
    """What tells a changed file apart; (-1, -1) for one that cannot be examined (a broken link)."""
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


def resolve_source(cfg: DataConfig) -> Source:
    """Check `cfg.source` and list what it holds; a bad source is a one-line `DataError`."""
    text = cfg.source.strip()
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            known = ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
            raise DataError(f"data source {text!r}: unknown builtin (known: {known})")
        identity = {"builtin": name, "version": faces.VERSION, "size": cfg.builtin_size, "seed": cfg.seed}
        return Source(text, "builtin", None, (), identity)

    if not text:
        raise DataError(f"data source '': empty ({EXPECTED_SOURCE})")
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        members = list_image_files(path)
        files = [[name, *size_and_mtime(path / name)] for name in members]
        kind = "folder"
    elif path.is_file() and zipfile.is_zipfile(path):
        try:
            members = read_zip_members(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"data source {text!r}: not a readable zip archive ({err})") from None
        files = [[path.name, *size_and_mtime(path)]]
        kind = "zip"
    elif path.exists():
        raise DataError(f"data source {text!r}: not a folder or a .zip archive ({EXPECTED_SOURCE})")
    else:
        raise DataError(f"data source {text!r}: no such file or folder ({EXPECTED_SOURCE})")

    if not members:
        wanted = ", ".join(IMAGE_EXTENSIONS)
        raise DataError(f"data source {text!r}: no usable image (found no {wanted} files)")
    return Source(text, kind, path, tuple(members), {"path": str(path), "files": files})


@contextmanager
def member_reader(source: Source) -> Iterator[Callable[[str], bytes]]:
    """A function that returns the raw bytes of one member of a folder or zip source."""
    assert source.path is not None
    if source.kind == "folder":
        yield lambda name: (source.path / name).read_bytes()
    else:
        with zipfile.ZipFile(source.path) as archive:
            yield archive.read


# --------------------------------------------------------------------------- preprocessing


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
    last_report = time.monotonic()
    with bombs_are_errors(), ThreadPoolExecutor(workers) as pool, member_reader(source) as read:
        for start in range(0, total, chunk):
            blobs: dict[int, bytes] = {}  # read on this thread, decoded on the pool
            for i, name in enumerate(source.members[start:start + chunk], start):
                try:
                    blobs[i] = read(name)
                except Exception as err:  # unreadable file, bad zip member: skipped like a bad image
                    failures[i] = f"cannot be read ({err})"
            results = pool.map(decode_or_reason, blobs.values(), repeat(resolution))
            for i, result in zip(blobs, results):
                if isinstance(result, str):
                    failures[i] = result
                else:
                    out[i] = result.transpose(2, 0, 1)
            if time.monotonic() - last_report > 10:
                logger.info("decoded %d/%d images of %s", min(start + chunk, total), total, source.text)
                last_report = time.monotonic()
    return failures


def load_image_file(path: str | Path, resolution: int) -> torch.Tensor:
    """One image file, preprocessed like a data set: uint8 `(3, resolution, resolution)`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image '{path}': no such file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"image '{path}': cannot be read ({err.strerror})") from None
    try:
        with bombs_are_errors():
            array = decode_image(data, resolution)
    except UndecodableImage as err:
        raise DataError(f"image '{path}': not a usable image ({err.reason})") from None
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


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


def temporary_path(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process, for writing before a rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_cache_atomically(path: Path, rows: np.ndarray, order: np.ndarray) -> None:
    """Write `rows[order]` as a .npy at `path`, in chunks, via a temporary file and a rename."""
    tmp = temporary_path(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(order), *rows.shape[1:]))
        for start in range(0, len(order), 1024):
            out[start:start + 1024] = rows[order[start:start + 1024]]
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_index_atomically(path: Path, index: CacheIndex) -> None:
    tmp = temporary_path(path)
    try:
        tmp.write_text(json.dumps(asdict(index), indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


# --------------------------------------------------------------------------- tensors


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255], clamped and rounded (NaN becomes mid-grey)."""
    scaled = (torch.nan_to_num(images.float(), nan=0.0) + 1.0) * 127.5
    return scaled.round().clamp(0, 255).to(torch.uint8)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a `(N, C, H, W)` batch left-right with probability 1/2."""
    device = generator.device if generator is not None else images.device
    flip = torch.rand(images.shape[0], generator=generator, device=device).to(images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
