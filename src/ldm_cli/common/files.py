"""Where commands write: refuse to overwrite existing results, and fail early when the
destination cannot be written (DESIGN.md: nothing already on disk is lost)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

from ldm_cli.errors import UsageError


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
