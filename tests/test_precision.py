"""Sampling precision: `--precision auto|fp32|bf16` and what auto means on a device."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ldm_cli.cli import app
from ldm_cli.common import device as device_module
from ldm_cli.common.device import has_native_bf16, resolve_precision
from ldm_cli.config import UNetConfig
from ldm_cli.diffusion.sampling import sample
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.errors import UsageError
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
