"""Every bad input a user can give: the exit code, one clear line, no traceback, and
nothing already on disk lost. README.md's "Bad input" table lists the same cases."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import PickleTrap, tiny_denoiser_overrides, tiny_vae_overrides
from ldm_cli.cli import app
from ldm_cli.data.faces import draw_face

runner = CliRunner()


def ldm(*args):
    return runner.invoke(app, [str(a) for a in args])


def sets(values):
    return [arg for value in values for arg in ("--set", value)]


def snapshot(folder: Path) -> dict[str, str]:
    """Digest of every file under `folder`, to prove nothing was lost or changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def expect(result, code: int, *fragments: str) -> list[str]:
    """The exit code, no traceback, and (for errors) exactly one `ldm: error:` line with the fragments."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("ldm: error:")]
    if code != 0:
        assert len(errors) == 1, result.stderr
        for fragment in fragments:
            assert fragment in errors[0], errors[0]
    return errors


@pytest.fixture
def keep(tmp_path):
    """A file that must survive every failed command untouched."""
    precious = tmp_path / "precious.txt"
    precious.write_text("do not lose me")
    before = snapshot(tmp_path)
    yield tmp_path
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


def face_folder(folder: Path, count: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        draw_face(i, 24).save(folder / f"{i:03d}.png")
    return folder


def test_missing_config_file_exits_2_naming_the_file(keep):
    expect(ldm("train-vae", "--config", keep / "none.toml", "--out", keep / "run"), 2, "none.toml", "config file not found")


def test_unknown_config_key_exits_2_naming_the_dotted_key(keep):
    cfg = keep / "c.toml"
    cfg.write_text("[model]\nlatent_chanels = 4\n")
    expect(ldm("train-vae", "--config", cfg, "--out", keep / "run"), 2, "model.latent_chanels: unknown key")


def test_wrongly_typed_config_value_exits_2_naming_key_type_and_value(keep):
    cfg = keep / "c.toml"
    cfg.write_text("[train]\nbatch_size = 'big'\n")
    expect(ldm("train-vae", "--config", cfg, "--out", keep / "run"), 2, "train.batch_size", "integer", "'big'")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_zero_or_negative_max_steps_exit_2_asking_for_more_than_0(keep, steps):
    expect(ldm("train-vae", "--max-steps", steps, "--out", keep / "run"), 2, "train.max_steps", "greater than 0")


def test_set_override_of_missing_key_exits_2_saying_no_such_key(keep):
    expect(ldm("train-vae", "--set", "optim.learning_rate=1e-3", "--out", keep / "run"), 2,
           "--set optim.learning_rate: no such key")


@pytest.mark.parametrize("strength", ["0", "1.01", "-0.5"])
def test_reimagine_strength_outside_0_1_exits_2_naming_the_interval(keep, trained_denoiser, strength):
    image = keep / "face.png"
    draw_face(0, 16).save(image)
    expect(ldm("reimagine", "--checkpoint", trained_denoiser, "--image", image, "--strength", strength,
               "--out", keep / "re"), 2, f"--strength {float(strength)}", "(0, 1]")


def test_sample_steps_above_T_exit_2_naming_T(keep, trained_denoiser):
    expect(ldm("sample", "--checkpoint", trained_denoiser, "--ddim", "--steps", 1000, "--out", keep / "s"), 2,
           "--steps 1000", "T = 50")


def test_data_folder_with_no_images_exits_2_naming_the_folder(keep):
    empty = keep / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    expect(ldm("train-vae", *sets(tiny_vae_overrides(keep / "run", 2)), "--data", empty), 2, str(empty))


def test_non_image_and_truncated_png_are_skipped(keep):
    folder = face_folder(keep / "mixed")
    (folder / "fake.png").write_bytes(b"this is not a png")
    good = (folder / "000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    result = ldm("train-vae", *sets(tiny_vae_overrides(keep / "run", 2)), "--data", folder,
                 "--set", "data.resolution=16")
    expect(result, 0)
    warnings = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(warnings) == 1 and "2" in warnings[0], result.stderr


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16"])
def test_alpha_palette_gray_and_16_bit_images_are_converted(keep, mode):
    folder = face_folder(keep / f"mode-{mode}".replace(";", ""), 36)
    for path in sorted(folder.glob("*.png"))[:20]:
        rgb = Image.open(path).convert("RGB")
        if mode == "I;16":
            gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
            Image.fromarray(gray).save(path)  # uint16 → mode I;16
        else:
            rgb.convert(mode).save(path)
    assert Image.open(sorted(folder.glob("*.png"))[0]).mode == mode
    result = ldm("train-vae", *sets(tiny_vae_overrides(keep / "run", 2)), "--data", folder)
    expect(result, 0)
    assert "skipped" not in result.stderr


def test_decompression_bomb_is_skipped_and_refused_as_image(keep, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 24 * 24 * 8)
    folder = face_folder(keep / "bomb", 36)
    Image.new("RGB", (200, 200), "red").save(folder / "bomb.png")  # 40,000 px > 2 × 4,608
    result = ldm("train-vae", *sets(tiny_vae_overrides(keep / "run", 2)), "--data", folder)
    expect(result, 0)
    assert "skipped" in result.stderr and "bomb.png" in result.stderr


def test_swapped_vae_and_denoiser_checkpoints_exit_2_naming_both_kinds(keep, trained_vae, trained_denoiser):
    expect(ldm("sample", "--checkpoint", trained_vae, "--out", keep / "s"), 2,
           "is a vae checkpoint, expected a denoiser checkpoint")
    expect(ldm("reconstruct", "--vae", trained_denoiser, "--out", keep / "r.png"), 2,
           "is a denoiser checkpoint, expected a vae checkpoint")
    expect(ldm("train-denoiser", *sets(tiny_denoiser_overrides(keep / "d", trained_denoiser, 2))), 2,
           "is a denoiser checkpoint, expected a vae checkpoint")


def test_denoiser_latent_shape_not_fitting_the_vae_exits_2_before_any_output(keep, trained_vae):
    expect(ldm("train-denoiser", *sets(tiny_denoiser_overrides(keep / "d", trained_vae, 2) + ["model.latent_channels=3"])),
           2, "(3, 8, 8)", "(2, 8, 8)")
    assert not (keep / "d").exists()


@pytest.mark.parametrize("content", ["truncated", "random"])
def test_truncated_or_random_safetensors_exit_2_as_unreadable(keep, trained_denoiser, content):
    bad = keep / f"{content}.safetensors"
    data = trained_denoiser.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if content == "truncated" else np.random.default_rng(0).bytes(4096))
    expect(ldm("sample", "--checkpoint", bad, "--out", keep / "s"), 2, str(bad), "not a readable safetensors file")


def test_pickle_given_as_checkpoint_is_never_unpickled(keep):
    marker = keep / "unpickled"
    bad = keep / "model.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": PickleTrap(str(marker))}))
    expect(ldm("sample", "--checkpoint", bad, "--out", keep / "s"), 2, "pickle", "never unpickles")
    assert not marker.exists()


def test_unwritable_output_directory_exits_2_saying_cannot_write(keep, trained_denoiser):
    expect(ldm("train-vae", *sets(tiny_vae_overrides("/sys/ldm-run", 2))), 2, "/sys", "cannot write")
    expect(ldm("sample", "--checkpoint", trained_denoiser, "--out", "/sys/ldm-samples"), 2, "cannot write")


def test_existing_outputs_are_not_overwritten(keep, trained_denoiser, trained_vae):
    out = keep / "samples"
    expect(ldm("sample", "--checkpoint", trained_denoiser, "--ddim", "--steps", 4, "--num-samples", 2, "--out", out), 0)
    before = snapshot(out)
    expect(ldm("sample", "--checkpoint", trained_denoiser, "--ddim", "--steps", 4, "--num-samples", 2, "--seed", 1,
               "--out", out), 2, "already exists", "--overwrite")
    assert snapshot(out) == before
    expect(ldm("sample", "--checkpoint", trained_denoiser, "--ddim", "--steps", 4, "--num-samples", 1, "--seed", 1,
               "--out", out, "--overwrite"), 0)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png"], "stale images are removed"
    recon = keep / "recon"
    expect(ldm("reconstruct", "--vae", trained_vae, "--num", 2, "--out", recon), 0)
    digest = snapshot(keep)["recon/reconstructions.png"]
    expect(ldm("reconstruct", "--vae", trained_vae, "--num", 2, "--out", recon), 2,
           "reconstructions.png' already exists")
    assert snapshot(keep)["recon/reconstructions.png"] == digest
