"""`ldm study` on the tiny session denoiser (T = 50, 16 px), in its quick form."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ldm_cli.commands.study import OUTPUTS, SCHEDULE_OUTPUTS, make_plan, run_study
from ldm_cli.commands.study_measure import Setting, mean_pairwise_distance, pareto_front
from ldm_cli.commands.study_schedules import SCHEDULES
from ldm_cli.errors import UsageError

NUM_SAMPLES = 16
SCHEDULE_UPDATES = 8


@pytest.fixture(scope="module")
def study(trained_denoiser, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops: threads only contend on a shared CPU
    try:
        report = run_study(trained_denoiser, out, num_samples=NUM_SAMPLES, seed=0, quick=True,
                           device=torch.device("cpu"), schedules=True, schedule_updates=SCHEDULE_UPDATES)
    finally:
        torch.set_num_threads(threads)
    return report, json.loads((out / "study.json").read_text())


def by_label(sets: list[dict]) -> dict[str, dict]:
    return {s["label"]: s for s in sets}


def test_every_file_is_written_and_decodes(study):
    report, _ = study
    for name in OUTPUTS + SCHEDULE_OUTPUTS:
        assert (report.out_dir / name).is_file(), name
        if name.endswith(".png"):
            with Image.open(report.out_dir / name) as img:
                img.verify()
    md = report.markdown.read_text()
    assert md.count("![") == 6 and "study-pareto.png" in md and "study-schedules.png" in md
    assert "data:image/png;base64," in report.html.read_text()
    assert not list(report.out_dir.glob(".*tmp*"))


def test_json_holds_every_section(study):
    _, numbers = study
    for section in ("steps_and_samplers", "diversity", "clip_limit", "determinism", "noise_schedules"):
        assert numbers[section]["reading"], section
    assert numbers["quick"] is True and numbers["diversity"]["grid_reading"]
    assert set(by_label(numbers["steps_and_samplers"]["sets"])) == {"DDIM-5", "DDIM-10", "DPM++-5", "DDPM"}
    assert [s["clip_limit"] for s in numbers["clip_limit"]["sets"]] == [None, 1.0]
    assert set(numbers["diversity"]["recall"]) == {"DDPM", "DDIM-50"}
    assert [s["strength"] for s in numbers["determinism"]["strengths"]] == [0.5, 1.0]
    for s in numbers["steps_and_samplers"]["sets"] + numbers["clip_limit"]["sets"]:
        assert s["count"] == NUM_SAMPLES and s["fd"] >= 0 and 0 <= s["legibility"] <= 1


def test_each_schedule_is_trained_for_the_same_updates_with_a_quality_curve(study):
    report, numbers = study
    runs = numbers["noise_schedules"]["runs"]
    assert [r["schedule"] for r in runs] == list(SCHEDULES)
    for run in runs:
        assert run["steps"] == list(range(1, SCHEDULE_UPDATES + 1))  # every updates // 8 = 1
        assert len(run["fd"]) == SCHEDULE_UPDATES and all(fd > 0 for fd in run["fd"])
        assert run["final"]["label"] == "DDIM-50" and run["final"]["count"] == NUM_SAMPLES
        config = (report.out_dir / "schedules" / run["schedule"] / "config.toml").read_text()
        assert f'schedule = "{run["schedule"]}"' in config and f"max_steps = {SCHEDULE_UPDATES}" in config
    assert numbers["noise_schedules"]["updates"] == SCHEDULE_UPDATES


def test_finished_schedule_runs_are_reused(study, trained_denoiser):
    from ldm_cli.commands.study_schedules import train_schedules

    report, _ = study
    run_config = trained_denoiser.parent / "config.toml"
    exported = [report.out_dir / "schedules" / s / "denoiser.safetensors" for s in SCHEDULES]
    before = [p.stat().st_mtime_ns for p in exported]
    curves = train_schedules(run_config, SCHEDULE_UPDATES, report.out_dir, overwrite=False)
    assert [p.stat().st_mtime_ns for p in exported] == before
    assert [c.steps[-1] for c in curves] == [SCHEDULE_UPDATES] * 3


def test_schedules_need_the_run_folder_of_the_denoiser(trained_denoiser, tmp_path):
    alone = tmp_path / "alone" / "denoiser.safetensors"
    alone.parent.mkdir()
    alone.write_bytes(trained_denoiser.read_bytes())
    with pytest.raises(UsageError, match="config.toml"):
        run_study(alone, tmp_path / "out", num_samples=NUM_SAMPLES, quick=True, schedules=True)
    with pytest.raises(UsageError, match="only goes with --schedules"):
        run_study(trained_denoiser, tmp_path / "out", num_samples=NUM_SAMPLES, quick=True, schedule_updates=5)
    assert not (tmp_path / "out").exists()


def test_ddim_repeats_itself_and_ddpm_does_not(study):
    _, numbers = study
    for s in numbers["diversity"]["strengths"]:
        assert s["diversity_ddim"] == 0.0
        assert s["diversity_ddpm"] > 0.0


def test_inversion_gives_the_input_back_at_strength_one(study):
    _, numbers = study
    top = numbers["determinism"]["strengths"][-1]
    assert top["strength"] == 1.0
    assert top["psnr"]["inversion+ddim"] > top["psnr"]["noise+ddim"] + 3
    assert top["feature_distance"]["inversion+ddim"] < top["feature_distance"]["noise+ddim"]


def test_seconds_per_image_grow_with_steps(study):
    _, numbers = study
    sets = by_label(numbers["steps_and_samplers"]["sets"])
    assert sets["DDIM-5"]["seconds_per_image"] < sets["DDPM"]["seconds_per_image"]
    assert sets["DDPM"]["model_steps"] == 50


def test_a_second_run_without_overwrite_is_refused(study, trained_denoiser):
    report, _ = study
    before = (report.out_dir / "study.json").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        run_study(trained_denoiser, report.out_dir, num_samples=NUM_SAMPLES, quick=True, device=torch.device("cpu"))
    assert (report.out_dir / "study.json").read_bytes() == before


def test_too_few_samples_are_refused_before_any_work(trained_denoiser, tmp_path):
    with pytest.raises(UsageError, match="num-samples"):
        run_study(trained_denoiser, tmp_path / "out", num_samples=2, quick=True)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_is_refused_before_anything_is_written(trained_denoiser, tmp_path):
    (tmp_path / "face.png").write_bytes(b"not a png")
    with pytest.raises(UsageError):
        run_study(trained_denoiser, tmp_path / "out", num_samples=NUM_SAMPLES, image=tmp_path / "face.png", quick=True)
    assert not (tmp_path / "out").exists()


def test_plan_caps_steps_at_T_and_keeps_ddpm_only_when_short():
    full = make_plan(50, quick=False)
    assert [s.steps for s in full.sets if s.sampler == "ddim"] == [5, 10, 20, 50]
    assert full.clip_base == Setting("ddim", 50) and len(full.strengths) == 4 and full.num_seeds == 8
    assert Setting("ddpm", None) not in make_plan(1000, quick=True).sets
    assert Setting("ddpm", None) in make_plan(1000, quick=False).sets


def test_pareto_front_and_pairwise_distance():
    from types import SimpleNamespace as NS

    def result(label, seconds, fd):
        return NS(setting=NS(label=label), seconds_per_image=seconds, scores=NS(fd=fd))

    results = [result("a", 1, 5.0), result("b", 2, 6.0), result("c", 3, 4.0), result("d", 0.5, 9.0)]
    assert [r.setting.label for r in pareto_front(results)] == ["d", "a", "c"]
    assert mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    assert mean_pairwise_distance(torch.ones(3, 4)) == 0.0


def test_ldm_study_runs_from_the_command_line(trained_denoiser, tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    out = tmp_path / "cli-study"
    result = CliRunner().invoke(app, ["study", "--checkpoint", str(trained_denoiser), "--out", str(out),
                                      "--num-samples", "8", "--quick"])
    assert result.exit_code == 0, result.output
    assert (out / "study.md").is_file() and (out / "study.json").is_file()
