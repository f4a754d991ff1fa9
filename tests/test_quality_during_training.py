"""Sample quality measured while the denoiser trains: FD and legibility of a fixed noise
draw, every `quality.every` updates and at the last, in metrics.csv and metrics.png."""

from __future__ import annotations

import csv
import math

from PIL import Image

from conftest import tiny_denoiser_overrides
from ldm_cli.config import DenoiserRunConfig, load_config
from ldm_cli.training import rundir
from ldm_cli.training.denoiser_task import train_denoiser


def rows_of(run):
    with open(run / rundir.METRICS_CSV, newline="") as f:
        return list(csv.DictReader(f))


def test_quality_is_measured_every_n_updates_and_at_the_end(tmp_path, trained_vae):
    run = tmp_path / "den"
    cfg = load_config(DenoiserRunConfig, None, tiny_denoiser_overrides(run, trained_vae, 12) + [
        "quality.every=5", "quality.samples=16", "quality.steps=3"])
    train_denoiser(cfg)
    rows = rows_of(run)
    measured = {int(r["step"]): r for r in rows if r["fd"]}
    assert sorted(measured) == [5, 10, 12]
    assert all(r["fd"] == r["legibility"] == "" for r in rows if int(r["step"]) not in measured)
    for row in measured.values():
        assert math.isfinite(float(row["fd"])) and float(row["fd"]) > 0
        assert 0.0 <= float(row["legibility"]) <= 1.0 and float(row["quality_seconds"]) > 0
    with Image.open(run / rundir.METRICS_PNG) as plot:
        assert plot.width > 3 * plot.height, "three panels: loss, FD and legibility"


def test_the_same_run_measures_the_same_numbers(tmp_path, trained_vae):
    """The measurement draws its own fixed noise and leaves the training streams alone."""
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        train_denoiser(load_config(DenoiserRunConfig, None, tiny_denoiser_overrides(run, trained_vae, 6) + [
            "quality.every=3", "quality.samples=8", "quality.steps=2"]))
        runs.append(rows_of(run))
    assert [r["fd"] for r in runs[0]] == [r["fd"] for r in runs[1]]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]
    plain = tmp_path / "plain"
    train_denoiser(load_config(DenoiserRunConfig, None, tiny_denoiser_overrides(plain, trained_vae, 6)))
    assert [r["loss"] for r in rows_of(plain)] == [r["loss"] for r in runs[0]], "training is unchanged by it"


def test_quality_on_data_without_the_face_network_is_turned_off_with_a_warning(tmp_path, trained_vae, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (16, 16), (i * 6, 100, 200 - i * 4)).save(folder / f"{i}.png")
    run = tmp_path / "den"
    train_denoiser(load_config(DenoiserRunConfig, None, tiny_denoiser_overrides(run, trained_vae, 3) + [
        f"data.source='{folder}'", "quality.every=1"]))
    assert "measured on builtin:faces only" in capsys.readouterr().err
    assert "fd" not in rows_of(run)[0]
