"""Writing files safely: write-then-rename, and refusing to overwrite results.

Every file `ldm` writes goes through `atomic_write`: the content is written to a
temporary sibling and renamed into place only when complete, so a reader never sees a
half-written file and a failed or killed write leaves the previous file as it was.
Commands call `claim_outputs` before any work, so nothing already on disk is lost.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ldm_cli.errors import DiskFullError, UsageError


def temporary_sibling(path: Path, *, shared: bool = False) -> Path:
    """A hidden name beside `path` to write before renaming: unique to this process, or
    (``shared``) the same for every process of a distributed run that writes into it."""
    return path.with_name(f".tmp-{path.name}" if shared else f".{path.name}.tmp-{os.getpid()}")


def remove(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def format_bytes(count: int) -> str:
    """A byte count for people: '1000 bytes', '4 KiB', '17.3 MiB'."""
    if count < 1024:
        return f"{count} bytes"
    value, unit = float(count), "bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{round(value, 1):g} {unit}"


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def require_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse (exit 1) a write of about `needed` bytes that would not fit, before it starts."""
    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(f"{what} needs about {format_bytes(needed)} in '{folder}', but only "
                            f"{format_bytes(free)} is free there; free some space or write elsewhere")


@contextmanager
def no_space_is_an_error(path: Path) -> Iterator[None]:
    """Turn "no space left on device" while writing `path` into one `DiskFullError` line."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        raise DiskFullError(f"cannot write '{path}': no space left on device "
                            f"({format_bytes(free_bytes(path))} free there)") from None


@contextmanager
def atomic_write(path: str | Path, *, shared: bool = False, owner: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write `path` at (a file, or a folder the caller creates);
    on success rename it onto `path`, on any failure remove it and re-raise.

    With ``shared``, the temporary name is the same in every process, so the processes
    of a distributed run can write into one folder; only the ``owner`` process clears,
    renames or removes it.
    """
    path = Path(path)
    tmp = temporary_sibling(path, shared=shared)
    if owner:
        remove(tmp)  # a leftover of a killed earlier write
    try:
        with no_space_is_an_error(path):
            yield tmp
            if owner:
                if tmp.is_dir():
                    remove(path)  # os.replace cannot replace a non-empty folder
                os.replace(tmp, path)
    finally:
        if owner:
            remove(tmp)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(path: Path) -> None:
    """Exit 2 unless files can be created at `path`: a folder is tried itself, a file (or a
    path not there yet) through its nearest existing parent folder."""
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"output '{path}': '{parent}' is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UsageError(f"output '{path}': cannot write in '{parent}' ({err.strerror or err})") from None


def claim_outputs(paths: Iterable[Path], overwrite: bool) -> None:
    """Refuse (exit 2) when any output already exists, unless `--overwrite`; check writability."""
    paths = list(paths)
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"output '{existing[0]}' already exists{more}; pass --overwrite to replace it")
    for path in paths:
        check_writable(path)
