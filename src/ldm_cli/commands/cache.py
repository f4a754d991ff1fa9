"""`ldm cache`: list the image caches in a cache folder, and prune them.

An entry is one prepared data set (`ldm_cli.data.cache`): its index
`<name>-<res>px-<key>.json` and the files beside it that share its stem — the uint8
images `<name>-<res>px-<key>-h<frac>-s<seed>.npy` and the reference statistics
`ldm evaluate` keeps there. Entries are removed whole, index first. What killed writes
leave (`.scratch-*` arrays, `atomic_write`'s `.NAME.tmp-PID` files, an entry whose
index is missing or unreadable) is removed once over an hour old: a younger one may
belong to a build running now. Nothing else in the folder is touched.

An entry another process is reading can still be removed on request (`all`, or
`older_than_days` when it was last used before that); a process that has already
opened its images keeps reading them (Linux, macOS), and the next one rebuilds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ldm_cli.common.files import format_bytes
from ldm_cli.data.cache import ENTRY_FILE, read_index
from ldm_cli.data.cache_folder import remove_files, scan_cache_folder
from ldm_cli.errors import UsageError

DAY = 24 * 3600.0
LEFTOVER_AGE = 3600.0  # seconds: a younger leftover may belong to a write still running


@dataclass(frozen=True)
class CacheEntry:
    """One prepared data set in the cache folder."""

    name: str  # the stem of its files, <name>-<res>px-<key>
    source: str  # the data source as written when it was built; "" when incomplete
    resolution: int
    images: int  # usable images stored
    bytes: int  # all its files together
    last_used: float  # seconds since the epoch: its newest file's mtime (a cache hit stamps the index)
    files: tuple[Path, ...]  # the index first
    complete: bool  # False: its index is missing or unreadable (a killed or running build)


def check_folder(cache_dir: Path) -> None:
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UsageError(f"cache folder '{cache_dir}': not a folder")


def describe_entry(stem: str, files: list[Path]) -> CacheEntry:
    """A `CacheEntry` from the files of one stem; its index says what it holds."""
    stats = [path.stat() for path in files]
    index = read_index(files[0]) if files[0].name == f"{stem}.json" else None
    return CacheEntry(
        name=stem,
        source=index.source if index else "",
        resolution=int(ENTRY_FILE.fullmatch(files[0].name)["resolution"]),
        images=index.count if index else 0,
        bytes=sum(s.st_size for s in stats),
        last_used=max(s.st_mtime for s in stats),
        files=tuple(files),
        complete=index is not None,
    )


def list_caches(cache_dir: str | Path) -> list[CacheEntry]:
    """Every cache entry in `cache_dir`, most recently used first; [] when there is no such folder."""
    cache_dir = Path(cache_dir).expanduser()
    check_folder(cache_dir)
    entries = []
    for stem, files in scan_cache_folder(cache_dir)[0].items():
        try:
            entries.append(describe_entry(stem, files))
        except OSError:  # removed while we looked
            continue
    return sorted(entries, key=lambda entry: entry.last_used, reverse=True)


def is_older(mtime: float, seconds: float, now: float) -> bool:
    return now - mtime > seconds


def prune_caches(cache_dir: str | Path, *, older_than_days: float | None = None, all: bool = False) -> list[Path]:
    """Remove whole cache entries from `cache_dir` and return the files removed.

    `all` removes every entry; `older_than_days` those not used for that many days.
    Either way, and with neither, leftovers of killed writes over an hour old go too.
    """
    if older_than_days is not None and not older_than_days >= 0:
        raise UsageError(f"prune: older than {older_than_days:g} days: give a number of days, 0 or more")
    cache_dir = Path(cache_dir).expanduser()
    check_folder(cache_dir)
    now = time.time()
    removed = []
    for entry in list_caches(cache_dir):
        if not entry.complete:
            chosen = is_older(entry.last_used, LEFTOVER_AGE, now)
        else:
            chosen = all or (older_than_days is not None and is_older(entry.last_used, older_than_days * DAY, now))
        if chosen:
            removed += remove_files(list(entry.files))
    for path in scan_cache_folder(cache_dir)[1]:
        try:
            old = is_older(path.stat().st_mtime, LEFTOVER_AGE, now)
        except OSError:
            continue
        if old:
            removed += remove_files([path])
    return removed


def format_entries(entries: list[CacheEntry]) -> list[str]:
    """One line per entry, then a total: what `ldm cache --list` prints."""
    lines = []
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        what = f"{entry.source}, {entry.images} images" if entry.complete else "incomplete"
        lines.append(f"{entry.name}  {what}, {entry.resolution}px, {format_bytes(entry.bytes)}, last used {used}")
    total = format_bytes(sum(entry.bytes for entry in entries))
    caches = "cache" if len(entries) == 1 else "caches"
    lines.append(f"{len(entries)} {caches}, {total} in total")
    return lines
