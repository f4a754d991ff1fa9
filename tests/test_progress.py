"""Progress of long work: time-based log lines off a terminal, never wrapped, and shown by
sampling, reimagine, latent encoding and the VAE's latent statistics."""

from __future__ import annotations

import io
import re

import pytest
import torch

from ldm_cli.common import progress
from ldm_cli.common.progress import ProgressReporter, setup_logging


@pytest.fixture
def log(monkeypatch, capsys):
    """Output off a terminal, with `ldm:` log lines on (captured) stderr; returns a reader of those lines."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    setup_logging(is_main=True)
    capsys.readouterr()

    def lines() -> list[str]:
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ldm: ")]

    yield lines
    setup_logging(is_main=True)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the reporter


def test_off_terminal_logs_at_most_one_line_per_five_seconds_plus_the_last(log):
    clock = FakeClock()
    with ProgressReporter("work", total=1000, clock=clock) as bar:
        for i in range(1, 1001):
            clock.now = i / 100  # 10 ms a step: 10 s in all
            bar.advance()
    lines = log()
    assert len(lines) == 2, lines  # one at 5 s, and the final one
    assert lines[0].startswith("ldm: work 500/1000 (")
    assert re.fullmatch(r"ldm: work 1000/1000 \(100\.00 it/s\)", lines[1]), lines[1]


def test_every_n_steps_stays_available_and_counts_steps_advanced_together(log):
    with ProgressReporter("train vae", total=35, every=10, clock=FakeClock()) as bar:
        for by in [4] * 8 + [3]:  # 4, 8, 12, …, 32, then 35
            bar.advance("loss 1.0", by=by)
    counts = [re.match(r"ldm: train vae (\d+)/35 loss 1\.0", line).group(1) for line in log()]
    assert counts == ["12", "20", "32", "35"]


def test_progress_lines_name_their_unit(log):
    with ProgressReporter("encode", total=3, unit="images", clock=FakeClock()) as bar:
        bar.advance(by=3)
    assert log() == ["ldm: encode 3/3 images (0.00 images/s)"]


def test_long_lines_are_never_wrapped_off_terminal(log):
    from ldm_cli.common.progress import make_console

    what = "sample" + " a-long-description" * 15
    with ProgressReporter(what, total=1) as bar:
        bar.advance("(5.13 steps/s, 1 process(es))")
    lines = log()
    assert len(lines) == 1 and len(lines[0]) > 300 and lines[0].startswith(f"ldm: {what} 1/1 (5.13 steps/s")

    out = io.StringIO()  # a file, not a terminal: rich would wrap at 80 columns
    console = make_console(file=out)
    assert not console.is_terminal and console.width == 80
    text = "x" * 70 + " updates in 4.2 s (5.13 steps/s, 1 process(es))"
    console.print(text)
    assert out.getvalue() == text + "\n"


def test_only_the_main_process_shows_progress(log):
    setup_logging(is_main=False)
    assert not ProgressReporter("work", total=5).enabled
    setup_logging(is_main=True)
    assert ProgressReporter("work", total=5).enabled


# --------------------------------------------------------------------------- sampling and reimagine


def test_sample_counts_model_evaluations_of_every_batch(trained_denoiser, tmp_path, log):
    from ldm_cli.commands.sample import run_sample

    run_sample(trained_denoiser, tmp_path, num_samples=3, batch_size=2, sampler="ddim", steps=4,
               device=torch.device("cpu"))
    assert log()[-1].startswith("ldm: sample 3 images (DDIM-4, 2 batch(es)) 8/8 steps (")  # 2 batches × 4 steps


def test_a_huge_sample_count_shows_progress_from_the_start(trained_denoiser, tmp_path, log, monkeypatch):
    import ldm_cli.commands.sample as sample

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0, raising=False)  # a line for every step
    monkeypatch.setattr(sample, "save_images", stop)  # end after the first batch
    with pytest.raises(Stop):
        sample.run_sample(trained_denoiser, tmp_path, num_samples=10**9, batch_size=2, sampler="ddim", steps=4,
                          device=torch.device("cpu"))
    lines = log()
    assert lines[0].startswith("ldm: sample 1000000000 images (DDIM-4, 500000000 batch(es)) 1/2000000000 steps")
    assert len(lines) == 4  # the first batch's steps


def test_reimagine_counts_both_passes(trained_denoiser, tmp_path, log):
    from ldm_cli.commands.reimagine import run_reimagine
    from ldm_cli.data.faces import draw_face

    face = tmp_path / "face.png"
    draw_face(3, 48).save(face)
    run_reimagine(trained_denoiser, face, tmp_path / "out", strengths=[0.5], steps=8, num_seeds=2,
                  device=torch.device("cpu"))
    # T = 50, strength 0.5: t = 24, so DDPM takes 25 steps and DDIM round(8·0.5) = 4, once for the
    # grid and once for the trajectory
    assert log()[-1].startswith("ldm: reimagine 1 strength(s) × 2 seed(s), DDPM and DDIM 58/58 steps (")


# --------------------------------------------------------------------------- latent encoding


@pytest.fixture(scope="module")
def vae_network(trained_vae):
    from ldm_cli.modelfiles.bundles import load_vae

    return load_vae(trained_vae).network


def test_latent_cache_build_shows_images_encoded_with_their_mirror_images(vae_network, log):
    from ldm_cli.training.latent_cache import build_latent_cache

    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    cache = build_latent_cache(vae_network, images, batch_size=4, device="cpu", flip=True)
    assert len(cache) == 20
    assert [line.split(" (")[0] for line in log()] == ["ldm: latent cache: encode 20/20 images"]

    build_latent_cache(vae_network, images, batch_size=4, device="cpu", flip=False, show_progress=False)
    assert log() == []  # what a process other than the main one does


def test_latent_statistics_at_vae_export_show_images_encoded(vae_network, log):
    from ldm_cli.models.latent_stats import measure_latent_stats

    measure_latent_stats(vae_network, torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8), batch_size=4)
    assert [line.split(" (")[0] for line in log()] == ["ldm: measure latent statistics: encode 6/6 images"]
