"""Faults around the image cache: special files in data folders, oversized files, cache
files that pile up, and a disk that fills while the cache is written.

The tests that could hang (a FIFO) or eat memory without bound (/dev/zero) on a
regression run their load in a child process with a timeout and a memory cap, so a
regression fails the test instead of stopping the suite.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_cli.config import DataConfig
from ldm_cli.data import cache, decoding, prepare, sources
from ldm_cli.data.prepare import load_images
from ldm_cli.errors import DataError, LdmError, UsageError

HOUR = 3600.0
DAY = 24 * HOUR


@pytest.fixture(autouse=True)
def no_real_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test forgets, the cache never lands in the real home folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LDM_CACHE_DIR", raising=False)


def config(source: str | Path, cache_dir: Path, **overrides) -> DataConfig:
    values = {"source": str(source), "resolution": 16, "cache_dir": str(cache_dir), **overrides}
    return DataConfig(**values)


def save_images(folder: Path, count: int, size: int = 24, start: int = 0) -> None:
    """`count` distinct flat-colour PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        Image.new("RGB", (size, size), (10 * i % 256, 255 - 10 * i % 256, 77)).save(folder / f"{i:03d}.png")


def noise_png(size: int) -> bytes:
    """A PNG that does not compress: about 3·size² bytes."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def age(path: Path, seconds: float) -> None:
    """Set `path`'s access and modification times to `seconds` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


# --------------------------------------------------------------------------- a child process with limits

CHILD_PRELUDE = """
import json, logging, resource, sys
from pathlib import Path

def cap_memory(extra=1 << 30):
    # at most `extra` more bytes of address space than now: an endless read fails fast
    size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))

class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []
    def emit(self, record):
        self.lines.append([record.levelname, record.getMessage()])

logs = Collect()
logging.getLogger("ldm").addHandler(logs)
logging.getLogger("ldm").setLevel(logging.INFO)
"""


def run_child(code: str, tmp_path: Path, timeout: float = 120) -> dict:
    """Run `code` (after CHILD_PRELUDE) in a fresh Python; it prints one JSON object last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home")}
    env.pop("LDM_CACHE_DIR", None)
    script = CHILD_PRELUDE + textwrap.dedent(code)
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child process did not finish in {timeout} s (it hangs)")
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- special files


@pytest.fixture
def special_folder(tmp_path: Path) -> Path:
    """imgs/: a PNG, a symlink to a PNG elsewhere, a FIFO and a link to /dev/zero, all named *.png."""
    folder = tmp_path / "imgs"
    save_images(folder, 1)
    save_images(tmp_path / "elsewhere", 1, start=5)
    (folder / "link.png").symlink_to(tmp_path / "elsewhere" / "005.png")
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    return folder


def test_a_fifo_and_a_link_to_dev_zero_in_a_data_folder_are_skipped_unread(
    tmp_path: Path, special_folder: Path
) -> None:
    result = run_child(
        f"""
        from ldm_cli.config import DataConfig
        from ldm_cli.data.prepare import load_images
        cap_memory()
        images = load_images(DataConfig(source={str(special_folder)!r}, resolution=16,
                                         holdout_fraction=0.0, cache_dir={str(tmp_path / "cache")!r}))
        print(json.dumps({{"count": len(images), "skipped": images.skipped, "logs": logs.lines}}))
        """,
        tmp_path,
        timeout=60,
    )
    assert result["count"] == 2, "the PNG and the symlink to a PNG are used"
    assert result["skipped"] == 2
    warnings = [message for level, message in result["logs"] if level == "WARNING"]
    assert len(warnings) == 1
    assert "skipped 2 of 4 files" in warnings[0]
    assert "fifo.png: not a regular file (a FIFO)" in warnings[0]
    assert "zero.png: not a regular file (a character device)" in warnings[0]


def test_load_image_file_names_a_fifo_a_device_and_a_folder(tmp_path: Path, special_folder: Path) -> None:
    result = run_child(
        f"""
        from ldm_cli.data.decoding import load_image_file
        from ldm_cli.errors import DataError
        cap_memory()
        messages = {{}}
        for name in ["fifo.png", "zero.png", "."]:
            try:
                load_image_file(Path({str(special_folder)!r}) / name, 16)
                messages[name] = "loaded"
            except DataError as err:
                messages[name] = str(err)
        print(json.dumps(messages))
        """,
        tmp_path,
        timeout=60,
    )
    assert result["fifo.png"].endswith("fifo.png': not a regular file (a FIFO)")
    assert result["zero.png"].endswith("zero.png': not a regular file (a character device)")
    assert result["."].endswith("': not a regular file (a folder)")
    assert all("\n" not in message for message in result.values())


def test_files_over_the_size_limit_are_skipped_even_when_their_size_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "imgs"
    save_images(folder, 2)
    (folder / "big.png").write_bytes(noise_png(64))  # about 12 KiB, a valid image
    proc_file = Path("/proc/self/maps")  # a regular file whose stat size is 0 but that holds many KiB
    if proc_file.is_file():
        (folder / "proc.png").symlink_to(proc_file)
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 4096)
    caplog.set_level(logging.WARNING, logger="ldm")
    images = load_images(config(folder, tmp_path / "cache", holdout_fraction=0.0))
    assert len(images) == 2
    (message,) = [r.getMessage() for r in caplog.records]
    assert "big.png: larger than 4 KiB" in message
    if proc_file.is_file():
        assert "proc.png: larger than 4 KiB" in message


def test_zip_members_over_the_size_limit_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "imgs.zip"
    small = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(small, format="PNG")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("small.png", small.getvalue())
        zf.writestr("big.png", noise_png(64))
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 4096)
    images = load_images(config(archive, tmp_path / "cache", holdout_fraction=0.0))
    assert len(images) == 1 and images.skipped == 1


def test_load_image_file_refuses_a_file_over_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(noise_png(64))
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 4096)
    with pytest.raises(DataError, match=r"big\.png': larger than 4 KiB$"):
        decoding.load_image_file(path, 16)


# --------------------------------------------------------------------------- pruning old caches


def cache_files(cache_dir: Path, suffix: str) -> list[str]:
    return sorted(p.name for p in cache_dir.glob(f"*{suffix}"))


def index_name(cfg: DataConfig) -> str:
    """The file name of the cache index `cfg` reads or writes."""
    return f"{cache.cache_stem(sources.resolve_source(cfg), cfg.resolution)}.json"


def test_a_rebuild_removes_the_superseded_cache_of_the_same_source_only(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    a, b = tmp_path / "a" / "imgs", tmp_path / "b" / "imgs"  # two sources with the same name
    save_images(a, 3)
    save_images(b, 3)
    configs = [config(a, cache_dir), config(a, cache_dir, resolution=24), config(b, cache_dir),
               config("builtin:faces", cache_dir, builtin_size=4), config("builtin:faces", cache_dir, builtin_size=5)]
    for cfg in configs:
        load_images(cfg)
    names = [index_name(cfg) for cfg in configs]
    assert cache_files(cache_dir, ".json") == sorted(names)

    save_images(a, 1, start=3)  # a/imgs changes: its 16px cache is rebuilt under a new key
    load_images(configs[0])
    assert index_name(configs[0]) != names[0]
    # kept: a/imgs at 24px, b/imgs (the same name, another folder), both builtin sizes
    assert cache_files(cache_dir, ".json") == sorted([index_name(configs[0]), *names[1:]])
    stems = {name.removesuffix(".json") for name in cache_files(cache_dir, ".json")}
    assert {npy.split("-h")[0] for npy in cache_files(cache_dir, ".npy")} == stems, "no .npy without its index"


def test_a_cache_hit_marks_the_cache_as_used(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    save_images(tmp_path / "imgs", 2)
    cfg = config(tmp_path / "imgs", cache_dir)
    load_images(cfg)
    (index,) = cache_dir.glob("*.json")
    age(index, 10 * DAY)
    load_images(cfg)
    assert time.time() - index.stat().st_mtime < HOUR


def test_a_cache_used_while_its_successor_is_built_is_kept_until_the_next_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    folder = tmp_path / "imgs"
    save_images(folder, 3)
    load_images(config(folder, cache_dir))
    (first,) = cache_dir.glob("*.json")
    age(first, HOUR)

    real_decode_all = prepare.decode_all

    def another_process_reads_the_first(*args, **kwargs):
        os.utime(first)  # what another process's cache hit on the first cache does meanwhile
        return real_decode_all(*args, **kwargs)

    monkeypatch.setattr(prepare, "decode_all", another_process_reads_the_first)
    save_images(folder, 1, start=3)
    load_images(config(folder, cache_dir))
    assert first.exists(), "in use while the second was built: kept"
    monkeypatch.undo()

    time.sleep(0.01)
    save_images(folder, 1, start=4)
    load_images(config(folder, cache_dir))
    assert not first.exists(), "not used since: removed by the next rebuild"
    assert len(cache_files(cache_dir, ".json")) == 1 and len(cache_files(cache_dir, ".npy")) == 1


# --------------------------------------------------------------------------- ldm cache --list / --prune


def make_caches(tmp_path: Path, cache_dir: Path) -> None:
    """A folder cache (3 images) and a builtin cache (4 faces) in `cache_dir`."""
    save_images(tmp_path / "imgs", 3)
    load_images(config(tmp_path / "imgs", cache_dir, holdout_fraction=0.0))
    load_images(config("builtin:faces", cache_dir, builtin_size=4, resolution=8))


def test_list_caches_describes_every_entry(tmp_path: Path) -> None:
    from ldm_cli.commands.cache import format_entries, list_caches

    cache_dir = tmp_path / "cache"
    make_caches(tmp_path, cache_dir)
    (cache_dir / "notes.txt").write_text("not a cache: not listed, never removed")
    entries = sorted(list_caches(cache_dir), key=lambda e: e.resolution)
    assert [(e.source, e.resolution, e.images) for e in entries] == [
        ("builtin:faces", 8, 4),
        (str(tmp_path / "imgs"), 16, 3),
    ]
    for entry in entries:
        files = [p for p in cache_dir.iterdir() if p.name.startswith(entry.name)]
        assert sorted(entry.files) == sorted(files) and len(files) == 2
        assert entry.bytes == sum(p.stat().st_size for p in files)
        assert entry.bytes > entry.images * 3 * entry.resolution**2
        assert time.time() - entry.last_used < HOUR
    lines = format_entries(entries)
    assert len(lines) == 3 and lines[0].startswith(entries[0].name) and "builtin:faces, 4 images, 8px" in lines[0]
    assert lines[2].startswith("2 caches, ") and lines[2].endswith(" in total")
    assert list_caches(tmp_path / "nowhere") == []


def test_prune_caches_removes_entries_unused_for_some_days_and_old_leftovers(tmp_path: Path) -> None:
    from ldm_cli.commands.cache import list_caches, prune_caches

    cache_dir = tmp_path / "cache"
    make_caches(tmp_path, cache_dir)
    stale = next(e for e in list_caches(cache_dir) if e.source == "builtin:faces")
    for path in stale.files:
        age(path, 3 * DAY)
    old_leftovers = [cache_dir / ".scratch-123-456.npy", cache_dir / ".imgs-16px-0123456789abcdef.json.tmp-77"]
    young_leftover = cache_dir / ".scratch-124-457.npy"  # may belong to a build running now
    for path in [*old_leftovers, young_leftover]:
        path.write_bytes(b"x")
    for path in old_leftovers:
        age(path, 2 * HOUR)
    (cache_dir / "notes.txt").write_text("not ours")
    age(cache_dir / "notes.txt", 30 * DAY)

    removed = prune_caches(cache_dir, older_than_days=2, all=False)
    assert sorted(removed) == sorted([*stale.files, *old_leftovers])
    assert [e.source for e in list_caches(cache_dir)] == [str(tmp_path / "imgs")]
    assert young_leftover.exists() and (cache_dir / "notes.txt").exists()
    load_images(config(tmp_path / "imgs", cache_dir, holdout_fraction=0.0))  # the kept entry still works


def test_prune_caches_all_removes_every_entry_but_not_other_files(tmp_path: Path) -> None:
    from ldm_cli.commands.cache import list_caches, prune_caches

    cache_dir = tmp_path / "cache"
    make_caches(tmp_path, cache_dir)
    (cache_dir / "notes.txt").write_text("not ours")
    (cache_dir / "sub").mkdir()
    removed = prune_caches(cache_dir, older_than_days=None, all=True)
    assert len(removed) == 4 and list_caches(cache_dir) == []
    assert names_in(cache_dir) == ["notes.txt", "sub"]
    assert prune_caches(tmp_path / "nowhere", older_than_days=None, all=True) == []


def test_prune_caches_refuses_a_negative_age(tmp_path: Path) -> None:
    from ldm_cli.commands.cache import prune_caches

    with pytest.raises(UsageError, match="older than -1 days"):
        prune_caches(tmp_path, older_than_days=-1, all=False)


# --------------------------------------------------------------------------- a full disk


def report_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Make `shutil.disk_usage` report `free` bytes free on every disk."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, (1 << 40) - free, free))


@pytest.mark.parametrize("kind", ["folder", "builtin", "new split"])
def test_too_little_free_space_is_one_error_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decode_counter: list[int], kind: str
) -> None:
    cache_dir = tmp_path / "cache"
    save_images(tmp_path / "imgs", 4)
    source = "builtin:faces" if kind == "builtin" else tmp_path / "imgs"
    if kind == "new split":
        load_images(config(source, cache_dir, builtin_size=4))
    before = names_in(cache_dir)
    decoded = decode_counter[0]
    report_free(monkeypatch, 1000)
    with pytest.raises(LdmError) as info:
        load_images(config(source, cache_dir, builtin_size=4, holdout_fraction=0.5))
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message
    assert f"cache folder '{cache_dir}'" in message
    assert "not enough free space" in message and "1000 bytes free" in message
    assert "LDM_CACHE_DIR" in message and "data.cache_dir" in message
    assert decode_counter[0] == decoded, "nothing decoded"
    assert names_in(cache_dir) == before, "nothing written, nothing left behind"


def test_a_full_disk_while_decoding_is_one_error_line_and_removes_the_scratch_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    save_images(tmp_path / "imgs", 4)
    real_decode_all = prepare.decode_all

    def disk_fills(source, resolution, out):
        real_decode_all(source, resolution, out)
        assert next(p.name for p in cache_dir.iterdir()).startswith(".scratch-"), "decoded into the scratch file"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare, "decode_all", disk_fills)
    with pytest.raises(LdmError) as info:
        load_images(config(tmp_path / "imgs", cache_dir))
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message
    assert f"cache folder '{cache_dir}': disk full" in message and "LDM_CACHE_DIR" in message
    assert names_in(cache_dir) == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Path:
    """A 1 MiB tmpfs, mounted for the test and unmounted after it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a 1 MiB tmpfs")
    disk = tmp_path / "tiny-disk"
    disk.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]
    mounted = subprocess.run(command, capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("pre-check", "not enough free space"),  # the real free space is too little
        ("builtin", "disk full"),  # 2.4 MB of faces written straight to the cache file
        ("scratch", "disk full"),  # 1.5 MB of decoded rows do not fit the scratch file
        ("final", "disk full"),  # the 0.6 MB scratch file fits, the 0.6 MB cache file then does not
    ],
)
def test_a_real_full_disk_is_one_error_line_not_a_crash(tmp_path: Path, tiny_disk: Path, case: str, expected: str) -> None:
    save_images(tmp_path / "imgs", 30 if case == "scratch" else 13, size=128)
    source = "builtin:faces" if case == "builtin" else str(tmp_path / "imgs")
    resolution = 64 if case == "builtin" else 128
    lie = case != "pre-check"  # report plenty of space, so the write itself meets the full disk
    result = run_child(
        f"""
        import shutil
        from ldm_cli.config import DataConfig
        from ldm_cli.data.prepare import load_images
        from ldm_cli.errors import LdmError
        if {lie}:
            shutil.disk_usage = lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40)
        try:
            load_images(DataConfig(source={source!r}, resolution={resolution}, builtin_size=200,
                                   cache_dir={str(tiny_disk)!r}))
            print(json.dumps({{"error": None}}))
        except LdmError as err:
            print(json.dumps({{"error": str(err), "exit_code": err.exit_code}}))
        """,
        tmp_path,
    )
    assert result["error"] is not None and result["exit_code"] == 1
    assert expected in result["error"] and "\n" not in result["error"]
    assert names_in(tiny_disk) == [], "no temporary file left behind"
