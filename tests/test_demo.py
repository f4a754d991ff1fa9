"""`ldm demo` end to end on tiny configs: every stage, the report, and reuse on a rerun."""

from __future__ import annotations

import re
from types import SimpleNamespace

from PIL import Image

from conftest import tiny_demo_overrides
from ldm_cli.commands import demo
from ldm_cli.commands.demo import demo_denoiser_config, demo_vae_config, run_demo

STAGES = ["train-vae", "reconstruct", "schedule-plot", "train-denoiser", "sample-ddpm", "sample-ddim", "evaluate",
          "reimagine"]


def test_the_scale_scales_the_training_budget(tmp_path):
    full, quick = demo_vae_config(tmp_path, 1.0), demo_vae_config(tmp_path, 0.2)
    assert quick.train.max_steps == round(full.train.max_steps / 5)
    assert quick.loss.beta_decay_steps < full.loss.beta_decay_steps
    assert quick.output.dir == str(tmp_path / "vae")


def test_the_seed_seeds_both_trainings(tmp_path, monkeypatch):
    """`ldm demo --seed 1` is an independent replicate, not the same models sampled anew."""
    assert demo_vae_config(tmp_path, 1.0).train.seed == 0
    assert demo_vae_config(tmp_path, 1.0, seed=7).train.seed == 7
    assert demo_denoiser_config(tmp_path, 1.0, seed=7).train.seed == 7
    trained_with = []

    def fake_train(cfg, *, resume: bool, overwrite: bool):
        trained_with.append((cfg.task_name, cfg.train.seed))
        return SimpleNamespace(final_step=cfg.train.max_steps, steps_per_second=1.0)

    monkeypatch.setattr(demo, "train_vae", fake_train)
    monkeypatch.setattr(demo, "train_denoiser", fake_train)
    for stage in demo.demo_stages(tmp_path, demo.DemoBudget(1.0, 0.1), 7):
        if stage.name in ("train-vae", "train-denoiser"):
            stage.run()
    assert trained_with == [("vae", 7), ("denoiser", 7)]


def test_demo_runs_every_stage_and_reuses_them(tmp_path):
    vae, den = tiny_demo_overrides()
    result = run_demo(tmp_path, minutes=0.1, vae_overrides=vae, denoiser_overrides=den, scale=0.01)
    assert list(result.records) == STAGES
    assert not any(r["reused"] for r in result.records.values())
    markdown = result.report_md.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) >= 12
    for rel in images:
        with Image.open(tmp_path / rel) as img:
            img.verify()
    page = result.report_html.read_text()
    assert page.count(";base64,") == len(images)
    assert page.count("data:image/gif;base64,") == 2, "the two trajectory animations"
    assert "mean PSNR" in markdown and "ᾱ" in markdown and "DDIM" in markdown
    scores = result.records["evaluate"]["scores"]
    assert set(scores) == {"samples", "floor", "vae_reconstruction", "prior"}
    assert scores["samples"]["count"] == 500 and f"| {scores['samples']['fd']:.2f} |" in markdown
    assert "closes" in markdown and (tmp_path / "evaluate" / "evaluate.json").is_file()

    again = run_demo(tmp_path, minutes=0.1, vae_overrides=vae, denoiser_overrides=den, scale=0.01)
    assert all(r["reused"] for r in again.records.values())
    assert again.records["train-vae"]["seconds"] == result.records["train-vae"]["seconds"]
