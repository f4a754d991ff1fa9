"""Sampling precision: `--precision auto|fp32|bf16` and what auto means on a device."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli.cli import app
from ldm_cli.common import device as device_module
from ldm_cli.common.device import has_native_bf16, model_in_precision, resolve_precision
from ldm_cli.config import UNetConfig
from ldm_cli.diffusion.sampling import sample
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.errors import LdmError, UsageError
from ldm_cli.models.unet import UNet


@pytest.mark.parametrize("capabilities, native", [
    ({"avx512_bf16": True, "amx_bf16": False}, True),
    ({"avx512_bf16": False, "amx_bf16": True}, True),
    ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, False),
    ({}, False),
])
def test_a_cpu_runs_bf16_natively_only_with_avx512_bf16_or_amx(monkeypatch, capabilities, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert has_native_bf16("cpu") is native


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(device_module, "has_native_bf16", lambda device: native)
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_an_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="--precision 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_bf16_model_calls_change_samples_only_by_rounding():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(latent_channels=2, latent_size=8, base_channels=16, channel_mults=[1, 2],
                           blocks_per_level=1, layer_scale_init=0.5)).eval()
    schedule = NoiseSchedule.create("cosine", 100)
    runs = {p: sample(unet, schedule, (8, 2, 8, 8), sampler="ddim", steps=10,
                      generator=torch.Generator().manual_seed(1), precision=p) for p in ("fp32", "bf16")}
    assert runs["bf16"].dtype == torch.float32
    difference = (runs["bf16"] - runs["fp32"]).abs().max()
    assert 0 < difference < 0.05 * runs["fp32"].std()


def test_a_bf16_model_is_a_bf16_copy_that_leaves_the_network_as_it_was():
    """bf16 runs a copy with bfloat16 weights (nothing cast per call), takes and returns
    float32, and leaves the float32 network, a compiled one included, untouched."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(latent_channels=2, latent_size=8, base_channels=16, channel_mults=[1, 2],
                           blocks_per_level=1, attention_levels=[1], layer_scale_init=0.5)).eval()
    before = {name: p.clone() for name, p in unet.state_dict().items()}
    z, t = torch.randn(4, 2, 8, 8), torch.tensor([0, 250, 500, 999])
    with torch.inference_mode():
        exact = unet(z, t)
        for model in (unet, torch.compile(unet, backend="eager")):
            bf16 = model_in_precision(model, "bf16")
            out = bf16(z, t)
            assert out.dtype == torch.float32
            assert 0 < (out - exact).abs().max() < 0.05 * exact.abs().max()
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert all(torch.equal(unet.state_dict()[name], value) for name, value in before.items())
    assert model_in_precision(unet, "fp32") is unet


def test_a_closed_form_model_runs_under_bf16_autocast():
    """A plain function has no weights to copy: its matrix products run in bf16 under autocast."""
    weight = torch.randn(3, 3)
    oracle = model_in_precision(lambda z, t: z @ weight, "bf16")
    z = torch.randn(5, 3)
    out = oracle(z, torch.zeros(5))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (z.bfloat16() @ weight.bfloat16()).float())


def test_ldm_sample_records_its_precision_and_refuses_an_unknown_one(trained_denoiser, tmp_path):
    runner = CliRunner()
    common = ["sample", "--checkpoint", str(trained_denoiser), "--num-samples", "2", "--ddim", "--steps", "5"]
    result = runner.invoke(app, common + ["--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "a" / "sample.json").read_text())
    assert record["precision"] == resolve_precision("auto", "cpu")
    result = runner.invoke(app, common + ["--out", str(tmp_path / "b"), "--precision", "fp32"])
    assert json.loads((tmp_path / "b" / "sample.json").read_text())["precision"] == "fp32"
    result = runner.invoke(app, common + ["--out", str(tmp_path / "c"), "--precision", "fp16"])
    assert result.exit_code == 2 and "--precision 'fp16'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "c").exists()


needs_a_cpp_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile's inductor backend needs a C++ compiler on a CPU")


@needs_a_cpp_compiler
def test_ldm_sample_compile_gives_the_images_of_the_uncompiled_network(trained_denoiser, tmp_path):
    """`--compile` changes only rounding (frozen weights, fused kernels), trajectory included,
    and a batch of another size (the last one) recompiles and runs."""
    runner = CliRunner()
    common = ["sample", "--checkpoint", str(trained_denoiser), "--num-samples", "3", "--batch-size", "2", "--ddim",
              "--steps", "3", "--trajectory"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = runner.invoke(app, common + ["--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    for index in range(3):
        eager, compiled = (np.asarray(Image.open(tmp_path / name / "images" / f"{index:06d}.png"), dtype=float)
                           for name in ("eager", "compiled"))
        assert np.abs(eager - compiled).mean() < 2.0  # of 255 levels
    assert (tmp_path / "compiled" / "trajectory.png").exists()


def test_a_failed_compilation_is_one_clear_error(monkeypatch):
    def broken_compile(module):
        def call(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(broken_compile, RuntimeError("no C++ compiler found"), None)
        return call
    monkeypatch.setattr(torch, "compile", broken_compile)
    unet = UNet(UNetConfig(latent_channels=2, latent_size=8, base_channels=16, channel_mults=[1, 2],
                           blocks_per_level=1)).eval()
    compiled = model_in_precision(unet, "fp32", compile=True)
    with pytest.raises(LdmError, match=r"^--compile: torch.compile could not compile the network \(no C\+\+ compiler "
                                       r"found\); sample without --compile$"):
        compiled(torch.randn(2, 2, 8, 8), torch.tensor([1, 2]))
