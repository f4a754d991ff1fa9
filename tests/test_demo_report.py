"""The demo report without training: its stage table, its training budget line (the
`--minutes` each training stage really ran with) and the animated trajectories."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ldm_cli.commands import demo

TRAINING_STAGES = ("train-vae", "train-denoiser")


def fake_records(vae_minutes: float | None, denoiser_minutes: float | None, reused: bool) -> dict:
    def training(minutes: float | None) -> dict:
        record = {"seconds": 60.0, "reused": reused, "steps": 100, "steps_per_second": 2.0}
        return record if minutes is None else {**record, "minutes": minutes}

    sampling = {"seconds": 5.0, "reused": reused, "steps": 10, "sampling_seconds": 4.0}
    return {
        "train-vae": training(vae_minutes),
        "reconstruct": {"seconds": 1.0, "reused": reused, "psnr": [20.0], "ssim": [0.5], "mean_psnr": 20.0,
                        "mean_ssim": 0.5},
        "schedule-plot": {"seconds": 1.0, "reused": reused, "warnings": []},
        "train-denoiser": training(denoiser_minutes),
        "sample-ddpm": sampling,
        "sample-ddim": sampling,
        "evaluate": {"seconds": 2.0, "reused": reused, "scores": {
            name: {"fd": fd, "legibility": legibility, "precision": 0.5, "recall": 0.5}
            for name, fd, legibility in (("samples", 12.0, 0.05), ("floor", 3.0, 0.34),
                                         ("vae_reconstruction", 7.0, 0.07), ("prior", 66.0, 0.0))}},
        "reimagine": {"seconds": 3.0, "reused": reused, "start_timesteps": {}, "ddim_steps": {}},
    }


@pytest.fixture
def folder(tmp_path):
    """The text files the report copies in; the images are only linked by the Markdown."""
    for stage in ("vae", "denoiser"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.toml").write_text("[train]\nmax_steps = 100\n")
    (tmp_path / "schedules").mkdir()
    (tmp_path / "schedules" / "schedules.csv").write_text("t,linear\n0,0.1\n")
    return tmp_path


def test_quality_section_places_the_samples_between_prior_and_floor(folder):
    markdown = demo.build_report(folder, fake_records(1.0, 1.0, reused=False), demo.DemoBudget(1.0, 0.1)).markdown()
    assert "| 12.00 | 0.050 |" in markdown and "closes 86% of the gap" in markdown


def test_stage_table_names_its_reused_column(folder):
    markdown = demo.build_report(folder, fake_records(1.0, 1.0, reused=True), demo.DemoBudget(1.0, 0.1)).markdown()
    assert "| stage | seconds | reused |" in markdown
    assert "| train-vae | 60.0 | yes |" in markdown


def test_budget_line_is_the_budget_the_models_were_trained_with(folder):
    same = demo.build_report(folder, fake_records(3.0, 3.0, reused=True), demo.DemoBudget(3.0, 0.3)).markdown()
    assert "Training budget --minutes 3." in same

    other = demo.build_report(folder, fake_records(3.0, 3.0, reused=True), demo.DemoBudget(7.0, 0.7)).markdown()
    assert "--minutes 7. " not in other and "Training budget --minutes 7" not in other
    assert ("Training budgets differ from this run's --minutes 7: train-vae ran with --minutes 3 (reused from an "
            "earlier run), train-denoiser ran with --minutes 3 (reused from an earlier run).") in other

    old = demo.build_report(folder, fake_records(None, None, reused=True), demo.DemoBudget(7.0, 0.7)).markdown()
    assert "train-vae ran with a budget not recorded" in old


def test_report_shows_the_animated_trajectory_of_both_samplers(folder):
    markdown = demo.build_report(folder, fake_records(1.0, 1.0, reused=False), demo.DemoBudget(1.0, 0.1)).markdown()
    for sampler in ("ddpm", "ddim"):
        assert f"(samples-{sampler}/trajectory.gif)" in markdown


def test_training_stages_record_their_minutes_and_keep_them_when_reused(tmp_path, monkeypatch):
    def fake_train(cfg, *, resume: bool, overwrite: bool):
        return SimpleNamespace(final_step=cfg.train.max_steps, steps_per_second=1.0)

    monkeypatch.setattr(demo, "train_vae", fake_train)
    monkeypatch.setattr(demo, "train_denoiser", fake_train)

    def training_stages(minutes: float) -> list[demo.DemoStage]:
        return [s for s in demo.demo_stages(tmp_path, demo.DemoBudget(minutes, minutes / 10), 0)
                if s.name in TRAINING_STAGES]

    records_path = tmp_path / "stages.json"
    first = demo.run_stages(training_stages(0.5), records_path)
    assert [first[name]["minutes"] for name in TRAINING_STAGES] == [0.5, 0.5]
    assert json.loads(records_path.read_text())["train-vae"]["minutes"] == 0.5

    for stage in training_stages(0.5):  # the models the fake training did not write
        for path in stage.outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"model")
    again = demo.run_stages(training_stages(2.0), records_path)
    assert all(again[name]["reused"] and again[name]["minutes"] == 0.5 for name in TRAINING_STAGES)
    assert demo.budget_text(again, 2.0).startswith("Training budgets differ from this run's --minutes 2: "
                                                   "train-vae ran with --minutes 0.5 (reused from an earlier run)")


def test_sampling_stages_need_their_animation_to_be_reused(tmp_path):
    outputs = {s.name: s.outputs for s in demo.demo_stages(tmp_path, demo.DemoBudget(1.0, 0.1), 0)}
    for sampler in ("ddpm", "ddim"):
        assert tmp_path / f"samples-{sampler}" / "trajectory.gif" in outputs[f"sample-{sampler}"]
