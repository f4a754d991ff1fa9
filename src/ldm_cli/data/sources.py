"""Data sources: an image folder, a .zip of images, or a built-in procedural set.

`resolve_source` checks what `DataConfig.source` names and lists the image files it
holds (by extension; listing opens no file); `member_reader` reads the raw bytes of one
of them. Only regular files are read (a symlink to one is fine), at most
`MAX_IMAGE_BYTES` of each: a FIFO, a device or an oversized file raises
`UnreadableFile` unread, and the load skips it like an undecodable image. What
identifies a source (its path, its files' sizes and modification times, or the
builtin's version, size and seed) becomes part of the image cache's key
(`ldm_cli.data.cache`).
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ldm_cli.common.files import format_bytes
from ldm_cli.config import DataConfig
from ldm_cli.data import faces
from ldm_cli.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # a GIF: its first frame
MAX_IMAGE_BYTES = 256 * 2**20  # bigger files are skipped unread: no photo is this large, an endless device is
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("faces",)
EXPECTED_SOURCE = "expected an image folder, a .zip of images, or builtin:faces"
MAX_EXTENSIONS = 5  # extensions named in the "ignored" line
FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass(frozen=True)
class Source:
    """A data source resolved from the config: what to read and what identifies it."""

    text: str  # as the user wrote it, for messages
    kind: str  # "folder", "zip" or "builtin"
    path: Path | None  # resolved absolute path; None for a builtin
    members: tuple[str, ...]  # image files relative to the folder, or zip member names
    identity: dict  # everything the cached pixels depend on, hashed into the cache key
    ignored: tuple[str, ...] = ()  # visible files that are not images by their extension

    @property
    def origin(self) -> str:
        """What tells two sources of the same name apart: the resolved path, or `builtin:NAME`."""
        return str(self.path) if self.path is not None else self.text


# --------------------------------------------------------------------------- listing


def is_hidden(name: str) -> bool:
    """A hidden file, or one in a hidden folder or a macOS resource fork (`__MACOSX/`)."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def is_image_name(name: str) -> bool:
    """An image extension (any case), and no hidden or macOS resource-fork part."""
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def split_by_extension(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The visible `names` as (images, others), each sorted; hidden ones are in neither."""
    visible = sorted(name for name in names if not is_hidden(name))
    return [n for n in visible if is_image_name(n)], [n for n in visible if not is_image_name(n)]


def extension_of(name: str) -> str:
    return PurePosixPath(name).suffix.lower() or "no extension"


def describe_ignored(names: Sequence[str]) -> str:
    """E.g. 'ignored 3 files that are not images by their extension (.json, .txt)'."""
    extensions = sorted({extension_of(name) for name in names})
    shown = ", ".join(extensions[:MAX_EXTENSIONS]) + (", …" if len(extensions) > MAX_EXTENSIONS else "")
    if len(names) == 1:
        return f"ignored 1 file that is not an image by its extension ({shown})"
    return f"ignored {len(names)} files that are not images by their extension ({shown})"


def list_files(folder: Path) -> list[str]:
    """Every file under `folder`, recursively, as relative POSIX paths; nothing is opened or read."""
    names = []
    for root, _dirs, files in os.walk(folder):
        relative = Path(root).relative_to(folder)
        names += [(relative / f).as_posix() for f in files]
    return names


def list_image_files(folder: Path) -> list[str]:
    """Image files under `folder`, recursively, as sorted relative POSIX paths."""
    return split_by_extension(list_files(folder))[0]


def list_zip_members(path: Path) -> list[str]:
    """The names of the files (not folders) in the zip archive at `path`."""
    with zipfile.ZipFile(path) as archive:
        return [info.filename for info in archive.infolist() if not info.is_dir()]


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
        members, ignored = split_by_extension(list_files(path))
        files = [[name, *size_and_mtime(path / name)] for name in members]
        kind = "folder"
    elif path.is_file() and zipfile.is_zipfile(path):
        try:
            members, ignored = split_by_extension(list_zip_members(path))
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"data source {text!r}: not a readable zip archive ({err})") from None
        files = [[path.name, *size_and_mtime(path)]]
        kind = "zip"
    elif path.exists():
        raise DataError(f"data source {text!r}: not a folder or a .zip archive ({EXPECTED_SOURCE})")
    else:
        raise DataError(f"data source {text!r}: no such file or folder ({EXPECTED_SOURCE}); "
                        "pass --data PATH to your images")

    if not members:
        wanted = ", ".join(IMAGE_EXTENSIONS)
        also = f"; {describe_ignored(ignored)}" if ignored else ""
        raise DataError(f"data source {text!r}: no usable image (found no {wanted} files{also})")
    return Source(text, kind, path, tuple(members), {"path": str(path), "files": files}, tuple(ignored))


# --------------------------------------------------------------------------- reading


class UnreadableFile(Exception):
    """A file skipped unread: not a regular file, or too large; `reason` says which."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def check_regular(mode: int) -> None:
    """Raise `UnreadableFile` naming the kind of anything that is not a regular file."""
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in FILE_KINDS if is_kind(mode)), "a special file")
        raise UnreadableFile(f"not a regular file ({kind})")


def too_large(limit: int) -> UnreadableFile:
    return UnreadableFile(f"larger than {format_bytes(limit)}")


def read_regular_file(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file at `path` (a symlink is followed), if at most `limit`
    (default `MAX_IMAGE_BYTES`).

    Anything else raises `UnreadableFile`: a FIFO, a device or a folder without being
    opened (opening a FIFO blocks; reading /dev/zero never ends), a larger file without
    being read past the limit. A file that cannot be opened raises `OSError`.
    """
    limit = MAX_IMAGE_BYTES if limit is None else limit
    check_regular(os.stat(path).st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    with open(os.open(path, flags), "rb") as f:  # non-blocking: a FIFO swapped in meanwhile cannot hang us
        info = os.fstat(f.fileno())
        check_regular(info.st_mode)  # what was opened, not what was there a moment ago
        if info.st_size > limit:
            raise too_large(limit)
        data = f.read(info.st_size + 1)  # the whole file, when its size tells the truth
        if len(data) > info.st_size:  # it holds more than it says (a /proc file, a growing file)
            data += f.read(limit + 1 - len(data))
    if len(data) > limit:
        raise too_large(limit)
    return data


def read_zip_member(archive: zipfile.ZipFile, name: str, limit: int | None = None) -> bytes:
    """The bytes of one zip member, if at most `limit` (default `MAX_IMAGE_BYTES`)."""
    limit = MAX_IMAGE_BYTES if limit is None else limit
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise too_large(limit)
    with archive.open(info) as member:
        data = member.read(limit + 1)  # the size in the archive can lie too
    if len(data) > limit:
        raise too_large(limit)
    return data


@contextmanager
def member_reader(source: Source) -> Iterator[Callable[[str], bytes]]:
    """A function that returns the raw bytes of one member of a folder or zip source;
    it raises `UnreadableFile` for a member that is skipped unread."""
    assert source.path is not None
    if source.kind == "folder":
        yield lambda name: read_regular_file(source.path / name)
    else:
        with zipfile.ZipFile(source.path) as archive:
            yield lambda name: read_zip_member(archive, name)
