"""The `ldm` command through Typer's test runner: outputs, exit codes, one-line errors."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_denoiser_overrides, tiny_vae_overrides
from ldm_cli.cli import app
from ldm_cli.data.decoding import load_image_file
from ldm_cli.data.pixels import to_float
from ldm_cli.data.faces import draw_face
from ldm_cli.diffusion.schedules import NoiseSchedule

runner = CliRunner()


def ldm(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_usage_error(result, *fragments: str) -> None:
    """Exit code 2, `ldm: error:` lines that say what is wrong, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("ldm: error:")]
    assert errors, result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


@pytest.fixture(scope="module")
def face_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "face.png"
    draw_face(3, 48).save(path)
    return path


def test_help_lists_every_command():
    result = ldm("--help")
    assert result.exit_code == 0
    for command in ("train-vae", "reconstruct", "schedule-plot", "train-denoiser", "sample", "reimagine"):
        assert command in result.output


def test_python_dash_m_runs_the_same_app():
    done = subprocess.run([sys.executable, "-m", "ldm_cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "train-denoiser" in done.stdout


def test_config_errors_are_one_line_each(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nmax_stepz = 3\n[optim]\nlr = "fast"\n')
    result = ldm("train-vae", "--config", bad, "--out", tmp_path / "run")
    assert_usage_error(result, f"{bad}: train.max_stepz: unknown key", f"{bad}: optim.lr:")
    assert len(result.stderr.strip().splitlines()) == 2
    assert not (tmp_path / "run").exists(), "nothing is written for a bad config"


def test_bad_override_zero_max_steps_and_missing_config_exit_2(tmp_path):
    assert_usage_error(ldm("train-vae", "--set", "train.nope=1"), "--set train.nope: no such key")
    assert_usage_error(ldm("train-vae", "--max-steps", "0", "--out", tmp_path / "r"), "train.max_steps", "greater than 0")
    assert_usage_error(ldm("train-vae", "--config", tmp_path / "missing.toml"), "config file not found")


def test_missing_data_source_exits_2(tmp_path):
    result = ldm("train-vae", "--data", tmp_path / "nowhere", "--out", tmp_path / "run",
                 *sets(tiny_vae_overrides(tmp_path / "run", 2)))
    assert_usage_error(result, str(tmp_path / "nowhere"))


def test_train_vae_exports_then_refuses_to_overwrite_the_run(tmp_path):
    out = tmp_path / "run"
    result = ldm("train-vae", *sets(tiny_vae_overrides(out, 3)))
    assert result.exit_code == 0, result.output
    assert "exported" in result.output and (out / "vae.safetensors").is_file()
    before = (out / "vae.safetensors").read_bytes()
    assert_usage_error(ldm("train-vae", *sets(tiny_vae_overrides(out, 3))), "already holds a run")
    assert (out / "vae.safetensors").read_bytes() == before


def test_reconstruct_writes_three_pictures_and_scores(trained_vae, tmp_path):
    out = tmp_path / "recon"
    result = ldm("reconstruct", "--vae", trained_vae, "--num", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert "mean" in result.output and "PSNR" in result.output
    with Image.open(out / "reconstructions.png") as grid:
        assert grid.width > grid.height / 4  # 2 columns, 4 rows, labelled
    for name in ("interpolations.png", "prior.png"):
        with Image.open(out / name) as img:
            img.verify()


def test_reconstruct_refuses_wrong_kind_and_garbage(trained_denoiser, tmp_path):
    assert_usage_error(ldm("reconstruct", "--vae", trained_denoiser, "--out", tmp_path / "x.png"),
                       "is a denoiser checkpoint, expected a vae checkpoint")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    assert_usage_error(ldm("reconstruct", "--vae", junk, "--out", tmp_path / "x.png"), "not a readable safetensors")


def test_schedule_plot_prints_table_and_note_and_writes_csv_and_png(tmp_path):
    result = ldm("schedule-plot", "--timesteps", 10, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "0.90" in result.output.replace("0.89", "0.90")
    assert "warning: the linear schedule with T=10 keeps" in result.output
    assert "warning: warning" not in result.output and "note: warning" not in result.output
    with open(tmp_path / "schedules.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cosine = NoiseSchedule.create("cosine", 10)
    assert len(rows) == 10
    assert float(rows[9]["alpha_bar_cosine"]) == pytest.approx(cosine.alphas_cumprod[9].item(), rel=1e-5)
    assert float(rows[0]["beta_linear"]) == pytest.approx(1e-4)
    with Image.open(tmp_path / "schedules.png") as img:
        img.verify()


def test_schedule_plot_draws_noised_latents_and_needs_vae_with_image(trained_vae, face_png, tmp_path):
    result = ldm("schedule-plot", "--timesteps", 10, "--vae", trained_vae, "--image", face_png, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "noised-latents.png") as grid:
        assert grid.width > 5 * grid.height / 2  # 11 columns, 2 rows
    assert_usage_error(ldm("schedule-plot", "--vae", trained_vae, "--out", tmp_path), "--vae and --image go together")


def test_denoiser_latent_shape_mismatch_is_refused_before_training(trained_vae, tmp_path):
    out = tmp_path / "run"
    args = tiny_denoiser_overrides(out, trained_vae, 2) + ["model.latent_size=4"]
    result = ldm("train-denoiser", *sets(args))
    assert_usage_error(result, "(2, 4, 4)", "(2, 8, 8)")
    assert not out.exists()


def test_train_denoiser_needs_a_vae(tmp_path):
    assert_usage_error(ldm("train-denoiser", "--out", tmp_path / "d"), "--vae")


def image_pixels(path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).int()


def test_sample_ddim_is_deterministic_and_batch_independent(trained_denoiser, tmp_path):
    """Each image's noise comes from its own seed: batches of 5 and of 2 give the same images,
    bit for bit in float32 on the CPU. In the default precision (bf16 on a CPU that runs it
    natively), and on a GPU, whose cuDNN picks its kernels by batch size, the network's kernels
    round differently for other batch sizes: a pixel may move by one level."""
    common = ["--checkpoint", trained_denoiser, "--num-samples", 5, "--ddim", "--steps", 8, "--seed", 7]
    fp32_tolerance = 1 if torch.cuda.is_available() else 0
    for precision, tolerance in (("fp32", fp32_tolerance), ("auto", 1)):
        a, b = tmp_path / precision / "a", tmp_path / precision / "b"
        assert ldm("sample", *common, "--precision", precision, "--batch-size", 5, "--out", a).exit_code == 0
        result = ldm("sample", *common, "--precision", precision, "--batch-size", 2, "--trajectory", "--out", b)
        assert result.exit_code == 0, result.output
        for i in range(5):
            name = f"images/{i:06d}.png"
            difference = (image_pixels(a / name) - image_pixels(b / name)).abs()
            assert difference.max() <= tolerance, (precision, name, difference.max())
            assert difference.float().mean() < 0.01, (precision, name)
    a, b = tmp_path / "auto" / "a", tmp_path / "auto" / "b"
    with Image.open(b / "trajectory.png") as img:
        img.verify()
    with Image.open(a / "grid.png") as img:
        img.verify()


def test_sample_ddpm_differs_by_seed(trained_denoiser, tmp_path):
    for seed in (1, 2):
        result = ldm("sample", "--load", trained_denoiser, "--num-samples", 2, "--seed", seed, "--out", tmp_path / str(seed))
        assert result.exit_code == 0, result.output
    assert (tmp_path / "1/images/000000.png").read_bytes() != (tmp_path / "2/images/000000.png").read_bytes()


def test_sample_refuses_steps_for_ddpm_steps_above_T_unknown_sampler_and_a_vae(trained_denoiser, trained_vae, tmp_path):
    base = ["sample", "--checkpoint", trained_denoiser, "--out", tmp_path]
    assert_usage_error(ldm(*base, "--steps", 10), "ddpm sampler uses every timestep")
    assert_usage_error(ldm(*base, "--ddim", "--steps", 51), "--steps 51", "T = 50")
    assert_usage_error(ldm(*base, "--sampler", "euler"), "--sampler 'euler'")
    assert_usage_error(ldm("sample", "--checkpoint", trained_vae, "--out", tmp_path),
                       "is a vae checkpoint, expected a denoiser checkpoint")


def test_reimagine_writes_grids_and_refuses_bad_strength_existing_output_missing_image(trained_denoiser, face_png, tmp_path):
    result = ldm("reimagine", "--checkpoint", trained_denoiser, "--image", face_png, "--steps", 8,
                 "--num-seeds", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "strength 0.25: t = 11" in result.output  # round(0.25·50) − 1
    for name in ("reimagine.png", "reimagine-trajectory.png"):
        with Image.open(tmp_path / name) as img:
            img.verify()
    for bad in ("0", "1.5", "-0.2"):
        assert_usage_error(ldm("reimagine", "--checkpoint", trained_denoiser, "--image", face_png,
                               "--strength", bad, "--out", tmp_path), f"--strength {float(bad)}")
    assert_usage_error(ldm("reimagine", "--checkpoint", trained_denoiser, "--image", face_png, "--out", tmp_path),
                       "reimagine.png' already exists", "--overwrite")
    assert_usage_error(ldm("reimagine", "--checkpoint", trained_denoiser, "--image", tmp_path / "nope.png",
                           "--out", tmp_path / "other"), "nope.png")


def test_reimagine_ddim_is_deterministic_and_ddpm_varies(trained_denoiser, face_png, tmp_path, monkeypatch):
    import ldm_cli.commands.reimagine as reimagine

    outputs: dict[str, list] = {}
    real_sample = reimagine.sample

    def recording_sample(model, schedule, shape, **kwargs):
        z = real_sample(model, schedule, shape, **kwargs)
        outputs.setdefault(kwargs["sampler"], []).append(z)
        return z

    monkeypatch.setattr(reimagine, "sample", recording_sample)
    reimagine.run_reimagine(trained_denoiser, face_png, tmp_path, strengths=[0.5], steps=8, num_seeds=2)
    ddpm, ddim = outputs["ddpm"][0], outputs["ddim"][0]
    assert torch.equal(ddim[0], ddim[1]), "DDIM from the same noised latent is deterministic"
    assert not torch.allclose(ddpm[0], ddpm[1]), "DDPM differs with the seed"


@pytest.mark.parametrize("seed", [0, 5])
def test_reimagine_forward_noise_is_independent_of_every_reverse_chain(trained_denoiser, face_png, tmp_path,
                                                                       monkeypatch, seed):
    """The ε that noises the image must not be the noise a DDPM chain then draws: with a
    shared stream, the first reverse step re-adds the very ε already in z_t."""
    import ldm_cli.commands.reimagine as reimagine
    from ldm_cli.modelfiles.bundles import load_denoiser

    calls: list[dict] = []
    real_sample = reimagine.sample

    def recording_sample(model, schedule, shape, **kwargs):
        if kwargs["sampler"] == "ddpm":  # copy the chains' generators before they are used
            calls.append({**kwargs, "generator": [torch.Generator().set_state(g.get_state())
                                                  for g in kwargs["generator"]]})
        return real_sample(model, schedule, shape, **kwargs)

    monkeypatch.setattr(reimagine, "sample", recording_sample)
    reimagine.run_reimagine(trained_denoiser, face_png, tmp_path, strengths=[0.5, 1.0], steps=8, num_seeds=3,
                            seed=seed, device=torch.device("cpu"))
    bundle = load_denoiser(trained_denoiser)
    z0 = bundle.vae.encode(to_float(load_image_file(face_png, bundle.vae.resolution).unsqueeze(0)))
    for call in calls:
        t = call["t_start"]
        alpha_bar = bundle.schedule.alpha_bar_at(t)
        eps = (call["z_start"][0] - alpha_bar**0.5 * z0[0]) / (1 - alpha_bar) ** 0.5  # the forward noise
        for generator in call["generator"]:
            first_reverse_noise = torch.randn(eps.shape, generator=generator)
            correlation = torch.corrcoef(torch.stack((eps.flatten(), first_reverse_noise.flatten())))[0, 1]
            assert abs(correlation) < 0.5, f"forward noise reused by a reverse chain (t={t}, r={correlation:.3f})"


def test_reimagine_invert_gives_the_input_back_where_fresh_noise_gives_a_new_face(trained_denoiser, face_png,
                                                                                    tmp_path, monkeypatch):
    """DDIM from a DDIM-inverted latent retraces the inversion (docs/MATH.md, §5); from
    fresh noise at strength 1 it ends wherever that noise leads."""
    import ldm_cli.commands.reimagine as reimagine
    from ldm_cli.modelfiles.bundles import load_denoiser

    outputs: dict[bool, torch.Tensor] = {}
    real_sample = reimagine.sample

    def keep_ddim(model, schedule, shape, **kwargs):
        z = real_sample(model, schedule, shape, **kwargs)
        if kwargs["sampler"] == "ddim" and kwargs.get("callback") is not None:
            outputs[current[0]] = z
        return z

    current = [False]
    monkeypatch.setattr(reimagine, "sample", keep_ddim)
    for invert in (False, True):
        current[0] = invert
        reimagine.run_reimagine(trained_denoiser, face_png, tmp_path / str(invert), strengths=[1.0], steps=50,
                                invert=invert, device=torch.device("cpu"))
    bundle = load_denoiser(trained_denoiser)
    z0 = bundle.vae.encode(to_float(load_image_file(face_png, bundle.vae.resolution).unsqueeze(0)))
    inverted_error = (outputs[True][0] - z0[0]).norm() / z0.norm()
    fresh_error = (outputs[False][0] - z0[0]).norm() / z0.norm()
    assert inverted_error < 0.05, f"the round trip strays by {inverted_error:.3f}"
    assert fresh_error > 10 * inverted_error
    result = ldm("reimagine", "--checkpoint", trained_denoiser, "--image", face_png, "--steps", 8, "--invert",
                 "--strength", "0.5", "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.output
