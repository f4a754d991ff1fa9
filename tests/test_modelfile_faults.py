"""Broken model files: every fault is one line naming the file and the field or tensor.

Real exported files (a tiny VAE and a tiny denoiser, untrained) are damaged one field
or one tensor at a time; loading must refuse each with a `CheckpointError` that names
what is wrong, never a traceback and never a silent load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from ldm_cli.cli import app
from ldm_cli.config import DataConfig, UNetConfig, VAEModelConfig
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.errors import CheckpointError
from ldm_cli.modelfiles.bundles import VAEBundle, export_denoiser, export_vae, load_denoiser, load_vae
from ldm_cli.models.latent_stats import LatentStats
from ldm_cli.models.unet import UNet
from ldm_cli.models.vae import VAE

DELETE = object()  # a damage value: remove the field or tensor

# --------------------------------------------------------------------------- fixtures


def tiny_vae_bundle() -> VAEBundle:
    """An untrained 16×16 VAE with 2×8×8 latents and neutral statistics."""
    cfg = VAEModelConfig(base_channels=8, channel_mults=[1, 2], downsample_factor=2, latent_channels=2)
    stats = LatentStats(mean=torch.zeros(2), std=torch.ones(2))
    return VAEBundle(network=VAE(cfg), stats=stats, data=DataConfig(resolution=16))


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tiny_vae_bundle()
    path = export_vae(tmp_path_factory.mktemp("vae") / "vae.safetensors", bundle.network, bundle.stats, bundle.data)
    load_vae(path)  # the undamaged file loads
    return path


@pytest.fixture(scope="module")
def denoiser_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vae = tiny_vae_bundle()
    unet = UNet(UNetConfig(latent_channels=2, latent_size=8, base_channels=16, channel_mults=[1, 2],
                           blocks_per_level=1, attention_levels=[1]))
    schedule = NoiseSchedule.create("linear", 50)
    path = tmp_path_factory.mktemp("denoiser") / "denoiser.safetensors"
    own_stats = LatentStats(mean=torch.full((2,), 0.1), std=torch.full((2,), 0.9))
    export_denoiser(path, unet, schedule, vae.with_stats(own_stats), vae.stats)
    load_denoiser(path)  # the undamaged file loads
    return path


def damaged(source: Path, target: Path, metadata: dict | None = None,
            tensors: dict[str, Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | object] | None = None) -> Path:
    """A copy of `source` with raw metadata strings and tensors replaced (DELETE removes them).

    A tensor damage is a tensor, or a function of the original tensor.
    """
    with safe_open(str(source), framework="pt") as f:
        header = dict(f.metadata())
        names = f.keys()
        weights = {name: f.get_tensor(name) for name in names}
    for key, value in (metadata or {}).items():
        if value is DELETE:
            header.pop(key)
        else:
            header[key] = value
    for name, value in (tensors or {}).items():
        if value is DELETE:
            weights.pop(name)
        else:
            weights[name] = value(weights[name]) if callable(value) else value
    save_file({name: t.contiguous() for name, t in weights.items()}, str(target), metadata=header)
    return target


def edited_json(source: Path, key: str, edit: Callable[[dict], object]) -> str:
    """The JSON string of metadata field `key` after `edit` (which returns the new value)."""
    with safe_open(str(source), framework="pt") as f:
        return json.dumps(edit(json.loads(f.metadata()[key])))


def refusal(load: Callable[[Path], object], path: Path) -> str:
    """The one-line `CheckpointError` that loading the file at `path` raises."""
    with pytest.raises(CheckpointError) as caught:
        load(path)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"checkpoint '{path}': "), message
    return message


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("field", ["model", "data", "latent_shape"])
def test_broken_json_in_a_vae_field_is_named(vae_file, tmp_path, field):
    path = damaged(vae_file, tmp_path / "vae.safetensors", {field: "{not json"})
    assert f"metadata field '{field}' is not valid JSON (" in refusal(load_vae, path)


@pytest.mark.parametrize("field", ["model", "schedule", "vae_model", "vae_data", "latent_shape", "steps"])
def test_broken_json_in_a_denoiser_field_is_named(denoiser_file, tmp_path, field):
    path = damaged(denoiser_file, tmp_path / "denoiser.safetensors", {field: "{not json"})
    assert f"metadata field '{field}' is not valid JSON (" in refusal(load_denoiser, path)


@pytest.mark.parametrize("field", ["kind", "format_version", "model", "data", "latent_shape"])
def test_a_missing_vae_field_is_named(vae_file, tmp_path, field):
    path = damaged(vae_file, tmp_path / "vae.safetensors", {field: DELETE})
    assert f"metadata lacks '{field}'" in refusal(load_vae, path)


@pytest.mark.parametrize("field", ["kind", "model", "schedule", "vae_model", "vae_data", "latent_shape"])
def test_a_missing_denoiser_field_is_named(denoiser_file, tmp_path, field):
    path = damaged(denoiser_file, tmp_path / "denoiser.safetensors", {field: DELETE})
    assert f"metadata lacks '{field}'" in refusal(load_denoiser, path)


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("model", "[1, 2]", "valid dictionary"),
    ("model", '{"base_channels": "eight"}', "base_channels"),
    ("data", '"builtin:faces"', "valid dictionary"),
    ("data", '{"resolution": 17}', "resolution 17"),  # not a multiple of the downsample factor
    ("latent_shape", "[2, 8]", ""),
    ("latent_shape", "[2, 4, 4]", "(2, 8, 8)"),  # not the shape the config gives
    ("latent_shape", '"2x8x8"', ""),
])
def test_a_vae_field_of_the_wrong_type_or_shape_is_named(vae_file, tmp_path, field, value, fragment):
    path = damaged(vae_file, tmp_path / "vae.safetensors", {field: value})
    message = refusal(load_vae, path)
    assert f"metadata field '{field}' " in message and fragment in message


def _without(key: str) -> Callable[[dict], dict]:
    return lambda value: {k: v for k, v in value.items() if k != key}


def _with(key: str, item: object) -> Callable[[dict], dict]:
    return lambda value: {**value, key: item}


@pytest.mark.parametrize(("field", "edit", "fragment"), [
    ("model", lambda value: [value], "valid dictionary"),
    ("model", _with("latent_channels", 3), "(3, 8, 8)"),  # latents the bundled VAE does not make
    ("schedule", _without("timesteps"), "timesteps"),
    ("schedule", _with("timesteps", 50.5), "timesteps"),
    ("schedule", _with("kind", "zigzag"), "zigzag"),
    ("schedule", lambda value: list(value.values()), "valid dictionary"),
    ("vae_model", _with("latent_channels", "two"), "latent_channels"),
    ("vae_data", _with("resolution", "big"), "resolution"),
    ("latent_shape", lambda value: value + [1], ""),
])
def test_a_denoiser_field_of_the_wrong_type_or_shape_is_named(denoiser_file, tmp_path, field, edit, fragment):
    path = damaged(denoiser_file, tmp_path / "denoiser.safetensors", {field: edited_json(denoiser_file, field, edit)})
    message = refusal(load_denoiser, path)
    assert f"metadata field '{field}' " in message and fragment in message


# --------------------------------------------------------------------------- tensors


def tensor_names(path: Path, prefix: str) -> list[str]:
    """The names of the tensors under `prefix.` in the file at `path`, sorted."""
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()
    return sorted(name for name in names if name.startswith(prefix + "."))


@pytest.mark.parametrize(("name", "damage", "fragment"), [
    ("vae.decoder.conv_out.weight", DELETE, "missing: vae.decoder.conv_out.weight"),
    ("vae.decoder.conv_out.weight", lambda t: t[:, :4],
     "vae.decoder.conv_out.weight has shape (3, 4, 3, 3) in the file, (3, 8, 3, 3) expected"),
    ("vae.decoder.conv_out.weight", lambda t: t.long(), "vae.decoder.conv_out.weight has dtype torch.int64"),
    ("vae.decoder.extra", torch.ones(2), "unexpected: vae.decoder.extra"),
    ("latent_stats.mean", DELETE, "missing: latent_stats.mean"),
    ("latent_stats.mean", torch.zeros(3), "latent_stats.mean has shape (3,) in the file, (2,) expected"),
    ("latent_stats.std", torch.tensor([1.0, 0.0]), "tensor 'latent_stats.std' holds values <= 0"),
])
def test_a_vae_tensor_missing_or_misshapen_is_named(vae_file, tmp_path, name, damage, fragment):
    path = damaged(vae_file, tmp_path / "vae.safetensors", tensors={name: damage})
    assert fragment in refusal(load_vae, path)


@pytest.mark.parametrize(("name", "damage", "fragment"), [
    ("denoiser", DELETE, "denoiser weights do not match its config: missing: denoiser."),
    ("vae", lambda t: t.reshape(1, -1), "VAE weights do not match its config: vae."),
    ("vae_latent_stats.std", DELETE, "missing: vae_latent_stats.std"),
    ("latent_stats.std", torch.ones(4), "latent_stats.std has shape (4,) in the file, (2,) expected"),
    ("latent_stats.std", -torch.ones(2), "tensor 'latent_stats.std' holds values <= 0"),
])
def test_a_denoiser_tensor_missing_or_misshapen_is_named(denoiser_file, tmp_path, name, damage, fragment):
    if "." not in name:
        name = tensor_names(denoiser_file, name)[0]
    path = damaged(denoiser_file, tmp_path / "denoiser.safetensors", tensors={name: damage})
    assert fragment in refusal(load_denoiser, path)


def test_many_faults_are_cut_to_a_few_names(vae_file, tmp_path):
    decoder = tensor_names(vae_file, "vae.decoder")
    path = damaged(vae_file, tmp_path / "vae.safetensors", tensors=dict.fromkeys(decoder, DELETE))
    message = refusal(load_vae, path)
    assert f"and {len(decoder) - 3} more" in message
    assert sum(name in message for name in decoder) == 3


@pytest.mark.parametrize("prefix", ["denoiser", "vae", "latent_stats", "vae_latent_stats"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(denoiser_file, tmp_path, prefix, value):
    name = tensor_names(denoiser_file, prefix)[0]

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t

    path = damaged(denoiser_file, tmp_path / "denoiser.safetensors", tensors={name: poisoned})
    message = refusal(load_denoiser, path)
    assert f"tensor '{name}' holds non-finite values (NaN/Inf); the file is damaged or came from a diverged run" \
        in message


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(("damage", "fragment"), [
    ({"metadata": {"schedule": "{not json"}}, "metadata field 'schedule' is not valid JSON ("),
    ({"tensors": {"latent_stats.mean": torch.tensor([0.0, float("nan")])}},
     "tensor 'latent_stats.mean' holds non-finite values (NaN/Inf)"),
])
def test_sample_prints_one_error_line_and_exits_2(denoiser_file, tmp_path, damage, fragment):
    path = damaged(denoiser_file, tmp_path / "broken.safetensors", **damage)
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(path), "-n", "1", "--sampler", "ddim",
                                      "--steps", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ldm: error: checkpoint '{path}': ") and fragment in lines[0], \
        result.stderr
