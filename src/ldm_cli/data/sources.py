"""Data sources: an image folder, a .zip of images, or a built-in procedural set.

`resolve_source` checks what `DataConfig.source` names and lists the image files it
holds; `member_reader` reads the raw bytes of one of them. What identifies a source
(its path, its files' sizes and modification times, or the builtin's version, size and
seed) becomes part of the image cache's key (`ldm_cli.data.cache`).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ldm_cli.config import DataConfig
from ldm_cli.data import faces
from ldm_cli.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("faces",)
EXPECTED_SOURCE = "expected an image folder, a .zip of images, or builtin:faces"


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
