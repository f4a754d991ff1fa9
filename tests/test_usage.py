"""A first run that feels right: one error format for every usage error, values that
pass the schema but cannot work refused up front, the design card's commands working as
written, help that reads well, and optional settings that can be turned off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_vae_overrides
from ldm_cli import __version__
from ldm_cli.cli import app
from ldm_cli.config import DenoiserRunConfig, load_config, packaged_config, to_toml

runner = CliRunner()


def ldm(*args, cwd: Path | None = None):
    """`ldm ARGS` in-process, optionally from another working folder."""
    if cwd is None:
        return runner.invoke(app, [str(a) for a in args])
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(previous)


def one_error(result, code: int = 2) -> str:
    """Exactly one `ldm: error:` line, the exit code, no traceback and no box."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("ldm: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------- one error format


@pytest.mark.parametrize(("args", "fragment"), [
    (["schedule-plot", "--timesteps", "0"], "--timesteps"),
    (["sample", "--ddim", "--sampler", "ddpm"], "--ddim contradicts --sampler ddpm"),
    (["reimagine"], "Missing option '--image'"),
    (["sample", "--no-such-option"], "No such option"),
    (["no-such-command"], "No such command"),
    (["sample", "--num-samples", "many"], "--num-samples"),
])
def test_every_usage_error_is_one_line_with_exit_2(args, fragment):
    assert fragment in one_error(ldm(*args))


def test_a_folder_given_as_a_config_says_it_is_a_folder(tmp_path):
    assert "is a folder, not a config file" in one_error(ldm("train-vae", "--config", tmp_path))


# --------------------------------------------------------------------------- values that cannot work


@pytest.mark.parametrize(("args", "fragment"), [
    (["sample", "--seed", str(2**70)], "--seed"),
    (["sample", "--clip-limit", "nan"], "--clip-limit nan: must be a finite number"),
    (["sample", "--eta", "inf"], "--eta inf: must be a finite number"),
    (["demo", "--minutes", "nan"], "--minutes nan: must be a finite number"),
    (["demo", "--minutes", "inf"], "--minutes inf: must be a finite number"),
    (["reimagine", "--image", "x.png", "--strength", "nan"], "--strength nan"),
    (["schedule-plot", "--beta-start", "0.02", "--beta-end", "0.001"], "beta_start <= beta_end"),
])
def test_options_outside_their_domain_are_refused_before_any_work(tmp_path, args, fragment):
    assert fragment in one_error(ldm(*args, cwd=tmp_path))


@pytest.mark.parametrize(("override", "fragment"), [
    ("train.seed=1180591620717411303424", "train.seed"),
    ("optim.adam_betas=[0.9, 1.0]", "optim.adam_betas.1: Input should be less than 1"),
    ("optim.lr=inf", "optim.lr: Input should be a finite number"),
    ("optim.lr=nan", "optim.lr: Input should be a finite number"),
    ("data.resolution=30", "data.resolution 30 is not divisible by model.downsample_factor 4"),
    ("logging.log_every=99999999999999999999", "must fit in 64 bits"),
])
def test_config_values_that_would_crash_later_are_refused_up_front(tmp_path, override, fragment):
    out = tmp_path / "run"
    assert fragment in one_error(ldm("train-vae", "--set", override, "--out", out))
    assert not out.exists()


def test_a_decreasing_linear_schedule_is_refused(tmp_path):
    line = one_error(ldm("train-denoiser", "--vae", "x.safetensors", "--set", "diffusion.schedule='linear'",
                         "--set", "diffusion.beta_start=0.02", "--set", "diffusion.beta_end=0.001",
                         "--out", tmp_path / "run"))
    assert "beta_start <= beta_end" in line


# --------------------------------------------------------------------------- the design card's commands


def test_sample_without_a_checkpoint_says_how_to_train_one(tmp_path):
    line = one_error(ldm("sample", "--ddim", "--steps", "50", cwd=tmp_path))
    assert "runs/denoiser/denoiser.safetensors" in line and "ldm train-denoiser" in line


def test_sample_without_a_checkpoint_uses_the_default_run_and_says_so(tmp_path, trained_denoiser):
    work = tmp_path / "work"
    (work / "runs" / "denoiser").mkdir(parents=True)
    shutil.copy(trained_denoiser, work / "runs" / "denoiser" / "denoiser.safetensors")
    proc = subprocess.run([sys.executable, "-m", "ldm_cli", "sample", "--ddim", "--steps", "4", "-n", "2"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "using runs/denoiser/denoiser.safetensors" in proc.stderr
    assert (work / "samples" / "grid.png").is_file()


@pytest.mark.parametrize(("args", "default"), [
    (["reimagine", "--image", "face.png"], "runs/denoiser/denoiser.safetensors"),
    (["reconstruct"], "runs/vae/vae.safetensors"),
    (["train-denoiser"], "runs/vae/vae.safetensors"),
])
def test_commands_that_need_a_model_name_the_default_they_looked_for(tmp_path, args, default):
    line = one_error(ldm(*args, cwd=tmp_path))
    assert default in line and "train" in line


def test_a_packaged_config_path_works_from_any_folder(tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ldm_cli", "train-vae", "--config", "configs/quickstart/vae.toml",
                           *[a for v in tiny_vae_overrides(work / "run", 2) for a in ("--set", v)]],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "using the packaged config" in proc.stderr
    assert (work / "run" / "vae.safetensors").is_file()


def test_the_ffhq_placeholder_source_asks_for_data(tmp_path):
    line = one_error(ldm("train-vae", "--config", packaged_config("vae.toml"), "--out", tmp_path / "run"))
    assert "--data" in line


# --------------------------------------------------------------------------- help


def test_version_and_short_help():
    result = ldm("--version")
    assert result.exit_code == 0 and result.output.strip() == f"ldm {__version__}"
    assert ldm("-h").exit_code == 0 and "Commands" in ldm("-h").output


def test_help_shows_flags_as_flags_and_the_defaults_that_matter():
    text = ldm("sample", "-h").output
    assert "<bool>" not in text and "--ddim " in text
    for default in ("[default: samples]", "[default: 0;", "ddpm, or ddim with --ddim", "50, at most T"):
        assert default in text, default
    train = ldm("train-vae", "-h").output
    assert "runs/vae" in train and "train.max_steps" in train
    assert "0.25, 0.5, 0.75 and 1" in ldm("reimagine", "-h").output
    assert "linear and cosine" in ldm("schedule-plot", "-h").output


def test_every_command_defaults_to_the_same_seed():
    for command in ("sample", "reimagine", "reconstruct", "schedule-plot", "demo"):
        assert "[default: 0;" in ldm(command, "-h").output, command


# --------------------------------------------------------------------------- optional settings


def test_an_optional_setting_can_be_turned_off_from_the_command_line_and_toml(tmp_path):
    base = packaged_config("quickstart/denoiser.toml")
    assert load_config(DenoiserRunConfig, base).diffusion.min_snr_gamma == 5.0
    off = load_config(DenoiserRunConfig, base, ["diffusion.min_snr_gamma=none"])
    assert off.diffusion.min_snr_gamma is None
    toml = tmp_path / "c.toml"
    toml.write_text(base.read_text().replace("min_snr_gamma = 5.0", 'min_snr_gamma = "none"'))
    assert load_config(DenoiserRunConfig, toml).diffusion.min_snr_gamma is None
    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(off))
    assert load_config(DenoiserRunConfig, saved) == off, "a run's config.toml keeps the setting off"


# --------------------------------------------------------------------------- what the commands print


def test_schedule_plot_prints_at_most_20_evenly_spaced_rows_and_keeps_all_in_the_csv(tmp_path):
    result = ldm("schedule-plot", "--timesteps", 1000, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    assert len(rows) == 20 and rows[0].split()[1] == "0" and rows[-1].split()[1] == "999"
    assert "20 of 1000 timesteps shown" in result.output
    assert len((tmp_path / "schedules.csv").read_text().splitlines()) == 1001


def test_a_resumed_run_says_how_many_updates_remain_and_nothing_else(tmp_path, capsys):
    from ldm_cli.config import VAERunConfig
    from ldm_cli.training.vae_task import train_vae

    run = tmp_path / "run"
    train_vae(load_config(VAERunConfig, None, tiny_vae_overrides(run, 10)))
    capsys.readouterr()
    train_vae(load_config(VAERunConfig, None, tiny_vae_overrides(run, 13)), resume=True)
    err = capsys.readouterr().err
    assert "training vae: 3 updates (steps 11–13)" in err and "nothing to train" not in err
    train_vae(load_config(VAERunConfig, None, tiny_vae_overrides(run, 13)), resume=True)
    err = capsys.readouterr().err
    assert "already at step 13 of 13; nothing to train" in err and "training vae:" not in err
