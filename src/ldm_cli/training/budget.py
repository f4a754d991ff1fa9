"""Wall-clock budgets: how many updates of the two training stages fit in a number of seconds.

A budget of B seconds for the pipeline (train-vae, then train-denoiser) is spent as

    B = F_vae + F_den + s · (N_vae · t_vae + N_den · t_den)

where t is the seconds per update of a stage on this machine, F its fixed seconds (start-up,
drawing the data, the latent cache, the export) and N its config's `train.max_steps`. One
factor s scales both step counts, so the configs' step ratio is the time split; or the VAE
gets a given share of the training time (docs/ARCHITECTURE.md, "Training budgets").

t comes from timing a few updates of the stage's model at its config's batch, with the speed
settings (bf16, channels-last, compile) that training resolves on this machine
(`training.speed`): `ldm demo --minutes` sizes its training this way, and
`benchmarks/cpu_speed.py` uses the same update steps for its tables.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm_cli.config import DenoiserRunConfig, VAERunConfig
from ldm_cli.models.unet import UNet
from ldm_cli.models.vae import VAE
from ldm_cli.training.optim import make_optimizer
from ldm_cli.training.speed import resolve_speed
from ldm_cli.training.vae_loss import vae_loss

UpdateStep = Callable[[], None]
CPU = torch.device("cpu")


@dataclass
class Calibration:
    """Seconds per update and fixed seconds of each stage, and the configs' own step counts."""

    vae_update: float
    vae_fixed: float
    den_update: float
    den_fixed: float
    vae_steps: int
    den_steps: int

    def factors(self, budget_seconds: float, vae_share: float | None = None) -> tuple[float, float]:
        """The scales of the two configs' steps that make the pipeline last `budget_seconds`:
        one factor for both (the configs' step ratio is the time split), or the VAE given
        `vae_share` of the training time."""
        training = max(budget_seconds - self.vae_fixed - self.den_fixed, 0.0)
        if vae_share is None:
            factor = training / (self.vae_steps * self.vae_update + self.den_steps * self.den_update)
            return factor, factor
        return (vae_share * training / self.vae_update / self.vae_steps,
                (1 - vae_share) * training / self.den_update / self.den_steps)


# --------------------------------------------------------------------------- one update, timed


def prepared(model: torch.nn.Module, channels_last: bool, compiled: bool) -> torch.nn.Module:
    """`model` in channels-last memory and/or compiled, as the speed settings ask."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compiled else model


def forward_autocast(bf16: bool, device: torch.device = CPU):
    """bf16 autocast of the forward pass, as `accelerator.prepare` wraps it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _synchronized(step: UpdateStep, device: torch.device) -> UpdateStep:
    """`step` that returns only when the device has finished it (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return step

    def synchronized() -> None:
        step()
        torch.cuda.synchronize(device)
    return synchronized


def vae_update(cfg: VAERunConfig, channels_last: bool, compiled: bool, bf16: bool = False,
               device: torch.device = CPU) -> UpdateStep:
    """One VAE update (forward, loss, backward, AdamW) on a random batch of the config's size."""
    torch.manual_seed(0)
    vae = VAE(cfg.model).to(device)
    model = prepared(vae, channels_last, compiled)
    optimizer = make_optimizer(vae, cfg.optim)  # as training builds it (fused where the config says)
    res = cfg.data.resolution
    x = torch.rand(cfg.train.batch_size, 3, res, res, device=device) * 2 - 1
    x = x.to(memory_format=torch.channels_last) if channels_last else x

    def step() -> None:
        with forward_autocast(bf16, device):
            reconstruction, posterior = model(x)
        loss, _ = vae_loss(x, reconstruction.float(), posterior, 1e-4, cfg.loss)  # float32, as in training
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _synchronized(step, device)


def denoiser_update(cfg: DenoiserRunConfig, channels_last: bool, compiled: bool, bf16: bool = False,
                    device: torch.device = CPU) -> UpdateStep:
    """One denoiser update on random latents of the config's batch and shape."""
    torch.manual_seed(0)
    unet = UNet(cfg.model).to(device)
    model = prepared(unet, channels_last, compiled)
    optimizer = make_optimizer(unet, cfg.optim)
    m = cfg.model
    z = torch.randn(cfg.train.batch_size, m.latent_channels, m.latent_size, m.latent_size, device=device)
    z = z.to(memory_format=torch.channels_last) if channels_last else z
    t = torch.randint(0, cfg.diffusion.timesteps, (cfg.train.batch_size,), device=device)
    half = len(z) // 2

    def step() -> None:
        with forward_autocast(bf16, device):
            if m.self_condition:
                # training adds a gradient-free first pass on half of the updates (Chen et al. 2023):
                # timed at its expected cost, one pass over half the batch in every update
                with torch.no_grad():
                    model(z[:half], t[:half], torch.zeros_like(z[:half]))
                prediction = model(z, t, torch.zeros_like(z))
            else:
                prediction = model(z, t)
        loss = (prediction.float() - z).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _synchronized(step, device)


def training_update(cfg: VAERunConfig | DenoiserRunConfig, device: torch.device = CPU) -> UpdateStep:
    """One update of `cfg`'s model on `device`, with the speed settings training resolves there.

    Not compiled on a GPU, where `auto` compiles: compiling would take longer than the timing,
    and the uncompiled update is the slower one, so the budget errs on the short side."""
    speed = resolve_speed(cfg.train, on_cuda=device.type == "cuda", model=cfg.task_name)
    build = vae_update if isinstance(cfg, VAERunConfig) else denoiser_update
    return build(cfg, speed.channels_last, speed.compile and device.type != "cuda", speed.bf16, device)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds_per_update(cfg: VAERunConfig | DenoiserRunConfig, device: torch.device = CPU, repeats: int = 7) -> float:
    """Median seconds of one training update of `cfg` on `device`."""
    return median_seconds(training_update(cfg, device), repeats, warmup=3)
