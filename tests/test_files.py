"""Safe writes: `atomic_write` and the writers built on it leave the old file whole and no
temporary file behind when a write fails midway (a full disk becomes one `DiskFullError`
naming the file); outputs are never silently replaced."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_cli.common.files import atomic_write, claim_outputs
from ldm_cli.errors import DiskFullError, UsageError


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_replaces_the_file_only_when_complete(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_write(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old", "the old file stays until the write completes"
    assert target.read_text() == "new"
    assert leftovers(tmp_path, {"out.txt"}) == []


def test_atomic_write_removes_its_temporary_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(DiskFullError, match=r"cannot write '.*out.txt': no space left on device \(.* free there\)"), \
            atomic_write(target) as tmp:
        tmp.write_text("half of it")
        raise disk_full()
    assert target.read_text() == "old"
    assert leftovers(tmp_path, {"out.txt"}) == []


def test_atomic_write_of_a_shared_folder_is_all_or_nothing(tmp_path):
    final = tmp_path / "step-00000002"
    with atomic_write(final, shared=True) as tmp:
        tmp.mkdir()
        (tmp / "state.pt").write_text("2")
    assert (final / "state.pt").read_text() == "2"
    with pytest.raises(RuntimeError), atomic_write(final, shared=True) as tmp:
        tmp.mkdir()
        (tmp / "state.pt").write_text("half")
        raise RuntimeError("killed")
    assert (final / "state.pt").read_text() == "2", "the complete folder survives a failed rewrite"
    assert leftovers(tmp_path, {"step-00000002"}) == []
    # a non-owner process neither renames nor removes: the owner does
    with atomic_write(tmp_path / "other", shared=True, owner=False) as tmp:
        tmp.mkdir()
    assert not (tmp_path / "other").exists() and tmp.is_dir()


def test_a_model_file_whose_write_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    import ldm_cli.modelfiles.format as fmt

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise disk_full()

    monkeypatch.setattr(fmt, "save_file", half_written)
    with pytest.raises(DiskFullError, match="vae.safetensors"):
        fmt.save_model(tmp_path / "vae.safetensors", "vae", {"w": torch.zeros(2)}, {})
    assert leftovers(tmp_path, set()) == []


def test_a_png_whose_write_fails_leaves_the_old_one_and_no_temporary_file(tmp_path, monkeypatch):
    from ldm_cli.common.pictures import save_png

    path = save_png(Image.new("RGB", (4, 4), (255, 0, 0)), tmp_path / "grid.png")
    before = path.read_bytes()

    def half_written(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise disk_full()

    monkeypatch.setattr(Image.Image, "save", half_written)
    with pytest.raises(DiskFullError, match="grid.png"):
        save_png(Image.new("RGB", (4, 4), (0, 0, 255)), path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path, {"grid.png"}) == []


def test_a_schedule_table_whose_write_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    import ldm_cli.commands.schedule_plot as schedule_plot
    from ldm_cli.diffusion.schedules import NoiseSchedule

    real_writer = schedule_plot.csv.writer

    class FailingWriter:
        def __init__(self, f):
            self.inner, self.rows = real_writer(f), 0

        def writerow(self, row):
            self.rows += 1
            if self.rows == 3:
                raise disk_full()
            self.inner.writerow(row)

    monkeypatch.setattr(schedule_plot.csv, "writer", FailingWriter)
    with pytest.raises(DiskFullError, match="schedules.csv"):
        schedule_plot.write_table({"cosine": NoiseSchedule.create("cosine", 10)}, tmp_path / "schedules.csv")
    assert leftovers(tmp_path, set()) == []


def test_existing_outputs_are_claimed_only_with_overwrite(tmp_path):
    (tmp_path / "grid.png").write_text("x")
    with pytest.raises(UsageError, match="grid.png' already exists; pass --overwrite"):
        claim_outputs([tmp_path / "grid.png", tmp_path / "images"], overwrite=False)
    claim_outputs([tmp_path / "grid.png", tmp_path / "images"], overwrite=True)
