"""Exported safetensors files: round trip, metadata, and refusing everything else."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from conftest import PickleTrap
from ldm_cli.config import VAEModelConfig
from ldm_cli.errors import CheckpointError
from ldm_cli.modelfiles.format import load_model, save_model
from ldm_cli.models.vae import VAE


def small_vae() -> VAE:
    return VAE(VAEModelConfig(base_channels=8, channel_mults=[1, 2], downsample_factor=2, latent_channels=2))


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    vae = small_vae()
    path = save_model(tmp_path / "m.safetensors", "vae", vae.state_dict(),
                      {"model": vae.cfg.model_dump(mode="json"), "steps": 12})
    loaded = load_model(path, "vae")
    assert loaded.kind == "vae"
    assert loaded.metadata["steps"] == 12
    assert VAEModelConfig.model_validate(loaded.metadata["model"]) == vae.cfg
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.tensors[key], value)
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file must be renamed away"


def test_prefixed_tensor_names_are_split_into_parts(tmp_path):
    path = save_model(tmp_path / "m.safetensors", "denoiser",
                      {"vae.w": torch.ones(2), "denoiser.w": torch.zeros(3)}, {})
    loaded = load_model(path, "denoiser")
    assert list(loaded.part("vae")) == ["w"] and loaded.part("denoiser")["w"].shape == (3,)


def test_wrong_kind_is_named(tmp_path):
    path = save_model(tmp_path / "vae.safetensors", "vae", {"w": torch.ones(1)}, {})
    with pytest.raises(CheckpointError, match="is a vae checkpoint, expected a denoiser checkpoint"):
        load_model(path, "denoiser")


def test_missing_truncated_random_and_foreign_files_are_refused_saying_why(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.safetensors", "vae")
    good = save_model(tmp_path / "good.safetensors", "vae", small_vae().state_dict(), {})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(truncated, "vae")
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(range(7, 250)) * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(noise, "vae")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(1)}, str(foreign))
    with pytest.raises(CheckpointError, match="not one written by ldm"):
        load_model(foreign, "vae")


def test_pickles_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    plain = tmp_path / "model.pkl"
    plain.write_bytes(pickle.dumps(PickleTrap(str(marker))))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(plain, "vae")
    torch_file = tmp_path / "model.pt"
    torch.save({"w": torch.ones(1), "boom": PickleTrap(str(marker))}, torch_file)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(torch_file, "vae")
    assert not marker.exists()


def test_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        load_model(tmp_path, "vae")


def raw_ldm_file(path, tensors=None, **header):
    """An ldm vae file written directly with safetensors: a valid header updated by `header` (None removes)."""
    metadata = {"format": "ldm", "format_version": "1", "kind": "vae", **header}
    save_file(tensors or {"w": torch.ones(2)}, str(path), metadata={k: v for k, v in metadata.items() if v is not None})
    return path


@pytest.mark.parametrize(("version", "fragment"), [
    (None, "metadata lacks 'format_version'"),
    ("one", "metadata field 'format_version' is 'one', not an integer"),
    ("1.0", "metadata field 'format_version' is '1.0', not an integer"),
    ("0", "metadata field 'format_version' is 0; ldm's format versions start at 1"),
    ("2", "metadata field 'format_version' is 2, newer than this ldm understands (1)"),
])
def test_a_missing_or_invalid_format_version_is_named(tmp_path, version, fragment):
    path = raw_ldm_file(tmp_path / "m.safetensors", format_version=version)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint '{path}': {fragment}")):
        load_model(path, "vae")


@pytest.mark.parametrize(("kind", "fragment"), [
    (None, "metadata lacks 'kind'"),
    ("unet", "metadata field 'kind' is 'unet', not one of vae, denoiser"),
])
def test_a_missing_or_unknown_kind_is_named(tmp_path, kind, fragment):
    path = raw_ldm_file(tmp_path / "m.safetensors", kind=kind)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint '{path}': {fragment}")):
        load_model(path, "denoiser")


@pytest.mark.parametrize("raw", ["{not json", "[1, 2", "NaN", '{"lr": Infinity}'])
def test_a_metadata_field_that_is_not_json_is_named(tmp_path, raw):
    path = raw_ldm_file(tmp_path / "m.safetensors", notes=raw)
    message = f"checkpoint '{path}': metadata field 'notes' is not valid JSON ("
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(path, "vae")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_floating_tensor_must_be_finite(tmp_path, dtype, value):
    poisoned = torch.tensor([1.0, value, 2.0], dtype=dtype)
    path = raw_ldm_file(tmp_path / "m.safetensors", {"steps": torch.arange(3), "a.w": torch.ones(2), "b.w": poisoned})
    message = (f"checkpoint '{path}': tensor 'b.w' holds non-finite values (NaN/Inf); "
               "the file is damaged or came from a diverged run")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(path, "vae")
