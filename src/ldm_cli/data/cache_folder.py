"""The cache folder's entries: which files make one prepared data set, when it was last
used, and removing the entries a rebuild supersedes (`ldm cache` lists and prunes them)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ldm_cli.data.cache import ENTRY_FILE, LEFTOVER, read_index
from ldm_cli.data.sources import Source

logger = logging.getLogger("ldm")


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
