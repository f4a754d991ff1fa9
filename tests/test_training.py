"""The shared training loop through train-vae: loss falls, files, refusal, resume."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

from conftest import tiny_vae_overrides
from ldm_cli.config import VAERunConfig, load_config
from ldm_cli.errors import ConfigError, UsageError
from ldm_cli.modelfiles.bundles import load_vae
from ldm_cli.training import rundir
from ldm_cli.training.distributed import BatchOrder
from ldm_cli.training.optim import learning_rate_factor
from ldm_cli.training.vae_task import train_vae


def read_rows(run):
    with open(run / rundir.METRICS_CSV, newline="") as f:
        return list(csv.DictReader(f))


def vae_config(out, steps=20, *extra):
    return load_config(VAERunConfig, None, tiny_vae_overrides(out, steps) + list(extra))


def test_tiny_run_learns_and_writes_its_files(tmp_path):
    run = tmp_path / "run"
    result = train_vae(vae_config(run, 60))
    assert result.final_step == 60 and result.steps_done == 60 and not result.preempted
    rows = read_rows(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 61))
    losses = [float(r["reconstruction"]) for r in rows]
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:10]) / 10, "reconstruction loss must fall"
    betas = [float(r["beta"]) for r in rows]
    assert betas[0] > betas[-1], "β decays over training"
    for name in ("config.toml", "metrics.png", "previews/step-00000010.png", "previews/step-00000060.png"):
        with Image.open(run / name) if name.endswith(".png") else open(run / name) as f:
            assert f is not None
    assert load_config(VAERunConfig, run / "config.toml") == vae_config(run, 60)
    bundle = load_vae(run / "vae.safetensors")
    assert bundle.latent_shape == (2, 8, 8)
    assert bundle.stats.std.shape == (2,) and (bundle.stats.std > 0).all()
    kept = [step for step, _ in rundir.complete_checkpoints(run)]
    assert kept == [50, 60], "keep_checkpoints = 2 prunes older states"


def test_existing_run_is_refused_then_overwritten(tmp_path):
    run = tmp_path / "run"
    train_vae(vae_config(run, 4))
    before = (run / "vae.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds a run; pass --resume .* or --overwrite"):
        train_vae(vae_config(run, 4))
    assert (run / "vae.safetensors").read_bytes() == before, "a refused run must not touch the old one"
    train_vae(vae_config(run, 6), overwrite=True)
    assert len(read_rows(run)) == 6


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(UsageError, match="holds no complete checkpoint"):
        train_vae(vae_config(tmp_path / "empty", 4), resume=True)


def test_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    train_vae(vae_config(straight, 20))
    split = tmp_path / "split"
    train_vae(vae_config(split, 10))
    result = train_vae(vae_config(split, 20), resume=True)
    assert result.steps_done == 10 and result.final_step == 20
    assert [int(r["step"]) for r in read_rows(split)] == list(range(1, 21))
    a = torch.load(rundir.latest_checkpoint(straight) / "state.pt", weights_only=True)
    b = torch.load(rundir.latest_checkpoint(split) / "state.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    for key in a["ema"]["shadow"]:
        torch.testing.assert_close(a["ema"]["shadow"][key], b["ema"]["shadow"][key], rtol=0, atol=1e-6)
    assert read_rows(straight)[-1]["loss"] == read_rows(split)[-1]["loss"]


def test_batch_order_is_a_partition_of_the_global_batch():
    one = BatchOrder(100, 16, accum=2, world=1, rank=0, seed=3)
    two = [BatchOrder(100, 16, accum=2, world=2, rank=r, seed=3) for r in range(2)]
    for step in (0, 5, 6, 7):
        whole = torch.cat([one.indices(step, m) for m in range(2)])
        parts = torch.cat([o.indices(step, m) for m in range(2) for o in two])
        assert sorted(whole.tolist()) == sorted(parts.tolist()) and len(set(whole.tolist())) == 16
    epoch0 = torch.cat([one.indices(s, m) for s in range(6) for m in range(2)])
    assert len(set(epoch0.tolist())) == 96, "an epoch visits distinct examples"
    with pytest.raises(ConfigError, match="larger than the training set"):
        BatchOrder(10, 16, 1, 1, 0, 0)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_ratio():
    from ldm_cli.config import OptimConfig

    cfg = OptimConfig(warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate_factor(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate_factor(9, cfg, 110) == pytest.approx(1.0)
    assert learning_rate_factor(60, cfg, 110) == pytest.approx(0.55)
    assert learning_rate_factor(110, cfg, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_first_step_matches_its_closed_form_with_decay_on_weights_only(fused):
    """One AdamW step from zero moments: m̂ = g and v̂ = g², so
    θ₁ = θ₀·(1 − lr·λ) − lr·g/(|g| + ε), with λ = weight_decay for weights and 0 for biases;
    the same with torch's fused kernel (the default on a CPU) and with its per-tensor loop."""
    from ldm_cli.config import OptimConfig
    from ldm_cli.training.optim import make_optimizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, adam_eps=1e-3, fused=fused)
    optimizer = make_optimizer(layer, cfg)
    assert bool(optimizer.defaults["fused"]) == fused
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    grads = {name: torch.randn_like(p) for name, p in layer.named_parameters()}
    for name, p in layer.named_parameters():
        p.grad = grads[name].clone()
    optimizer.step()
    for name, decay in (("weight", 0.1), ("bias", 0.0)):
        g = grads[name]
        expected = before[name] * (1 - cfg.lr * decay) - cfg.lr * g / (g.abs() + cfg.adam_eps)
        torch.testing.assert_close(getattr(layer, name).detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("saved_fused, fused", [(False, True), (True, False)])
def test_a_resumed_optimizer_keeps_the_kernel_its_config_asks_for(saved_fused, fused):
    """torch's load_state_dict would restore the checkpoint's `fused` flag with its moments."""
    from ldm_cli.config import OptimConfig
    from ldm_cli.training.optim import load_optimizer_state, make_optimizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    saved = make_optimizer(layer, OptimConfig(fused=saved_fused))
    layer(torch.randn(3, 4)).sum().backward()
    saved.step()
    resumed = make_optimizer(layer, OptimConfig(fused=fused))
    load_optimizer_state(resumed, saved.state_dict())
    assert [bool(group["fused"]) for group in resumed.param_groups] == [fused, fused]
    torch.testing.assert_close(resumed.state[layer.weight]["exp_avg"], saved.state[layer.weight]["exp_avg"])
    resumed.step()  # the moments and the step count work in the other kernel
    assert float(resumed.state[layer.weight]["step"]) == 2


def test_bf16_training_runs_the_network_in_bf16_and_its_loss_in_float32(tmp_path, monkeypatch):
    """Mixed precision casts the model's forward, not the loss: SSIM's local variances
    E[x²] − E[x]² and the KL would lose their digits to bf16 rounding."""
    from ldm_cli.evaluation import image_metrics
    from ldm_cli.models.vae import Decoder
    from ldm_cli.training import vae_loss

    seen = []
    real_ssim = image_metrics.ssim

    def recording_ssim(a, b, *args, **kwargs):
        seen.append((a.dtype, torch.is_autocast_enabled("cpu")))
        return real_ssim(a, b, *args, **kwargs)

    monkeypatch.setattr(vae_loss, "ssim", recording_ssim)
    outputs = []
    real_decode = Decoder.forward

    def recording_decode(self, z):
        out = real_decode(self, z)
        if torch.is_grad_enabled():  # a training step, not a preview or the export
            outputs.append(out.dtype)
        return out

    monkeypatch.setattr(Decoder, "forward", recording_decode)
    train_vae(vae_config(tmp_path / "run", 3, "train.mixed_precision='bf16'", "loss.structural='ssim'",
                         "loss.structural_weight=0.1"))
    assert outputs and set(outputs) == {torch.bfloat16}, "the network computes in bf16"
    assert seen and set(seen) == {(torch.float32, False)}, "the loss sees float32 outside autocast"


def test_the_ema_lives_on_the_device_the_model_trains_on(tmp_path, monkeypatch):
    """The EMA copies the model after it is moved: on a GPU a CPU shadow stopped the first update."""
    from ldm_cli.training import loop

    runs = []
    real_build_run = loop.build_run

    def recording_build_run(*args, **kwargs):
        runs.append(real_build_run(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(loop, "build_run", recording_build_run)
    train_vae(vae_config(tmp_path / "run", 2))
    (run,) = runs
    device = run.accelerator.device
    assert {p.device for p in run.raw_model.parameters()} == {device}
    assert {p.device for p in run.ema.shadow.parameters()} == {device}
    assert run.ema.updates == 2


def test_more_processes_than_gpus_on_a_node_is_one_line(monkeypatch):
    from ldm_cli.training.distributed import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    config = vae_config("unused", 2)
    with pytest.raises(UsageError, match=r"^2 processes on this node but 1 CUDA GPU\(s\): start at most 1 per node "
                                         r".*CUDA_VISIBLE_DEVICES="):
        make_accelerator(config.train, "vae")
