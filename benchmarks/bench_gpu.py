"""GPU speed of the FFHQ configs in one short run (under 5 minutes on one GPU).

Reports, for configs/vae.toml and configs/denoiser.toml on the GPU:
  - VAE training images/s (forward + backward + AdamW step),
  - denoiser training images/s from the latent cache (posterior sample → noise → U-Net),
  - DDIM-50 sampling images/s (U-Net steps plus the VAE decode),
  - peak GPU memory of each,
  - model FLOPs utilisation (MFU) of the denoiser step: FLOPs counted by
    torch.utils.flop_counter for one step, divided by the step time and the GPU's peak.

Speed options (bf16 autocast, channels-last, TF32, torch.compile) follow the same
`ldm_cli.training.speed` rules as training; pass --no-compile etc. to compare.

Without a CUDA GPU the script refuses (exit 2) with one line, unless --allow-cpu is
given, which runs the same code on tiny shapes to check it (used by the tests).

    python benchmarks/bench_gpu.py                 # on a GPU machine
    python benchmarks/bench_gpu.py --allow-cpu --tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm_cli.config import DenoiserRunConfig, VAERunConfig, load_config, packaged_config
from ldm_cli.diffusion.parametrization import VPredictionLoss
from ldm_cli.diffusion.sampling import sample
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.models.unet import UNet
from ldm_cli.models.vae import VAE
from ldm_cli.training.latent_cache import sample_posterior
from ldm_cli.training.speed import SpeedSettings, apply_speed_settings

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of common training GPUs.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def timed(fn: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of `fn` after `warmup` calls (the first ones include compilation)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def timed_with_peak(fn: Callable[[], object], warmup: int, repeats: int, on_cuda: bool) -> tuple[float, float]:
    """(median seconds, peak GPU memory in GiB, NaN on the CPU) of `fn`."""
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(fn, warmup, repeats, torch.cuda.synchronize if on_cuda else (lambda: None))
    return seconds, torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--denoiser-batch", type=int, default=256)
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: by name)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (a check of the script)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and batches (with --allow-cpu)")
    args = parser.parse_args()

    on_cuda = torch.cuda.is_available()
    if not on_cuda and not args.allow_cpu:
        print("bench_gpu: no CUDA GPU found; this benchmark measures GPU speed (use --allow-cpu --tiny to check "
              "the script on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if on_cuda else "cpu")
    settings = SpeedSettings(
        bf16=on_cuda and not args.no_bf16, channels_last=on_cuda and not args.no_channels_last,
        tf32=on_cuda, compile=on_cuda and not args.no_compile,
    )
    apply_speed_settings(settings)
    name = torch.cuda.get_device_name() if on_cuda else "cpu"

    vae_cfg = load_config(VAERunConfig, packaged_config("vae.toml"))
    den_cfg = load_config(DenoiserRunConfig, packaged_config("denoiser.toml"))
    if args.tiny:
        vae_cfg = load_config(VAERunConfig, packaged_config("quickstart/vae.toml"))
        den_cfg = load_config(DenoiserRunConfig, packaged_config("quickstart/denoiser.toml"))
        args.vae_batch, args.denoiser_batch, args.sample_batch, args.repeats = 4, 8, 4, 2
    res = vae_cfg.data.resolution
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    print(f"device {name}; bf16 {settings.bf16}, channels-last {settings.channels_last}, TF32 {settings.tf32}, "
          f"compile {settings.compile}")
    rows = []

    # ---- VAE training step
    vae = VAE(vae_cfg.model).to(device, memory_format=memory_format)
    vae_step_model = torch.compile(vae) if settings.compile else vae
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    x = torch.rand(args.vae_batch, 3, res, res, device=device).mul(2).sub(1).to(memory_format=memory_format)

    def vae_step() -> None:
        with autocast:
            x_hat, posterior = vae_step_model(x)
            loss = (x_hat.float() - x).abs().mean() + 1e-6 * posterior.kl().float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, peak = timed_with_peak(vae_step, 3, args.repeats, on_cuda)
    rows.append(("VAE train", args.vae_batch / seconds, peak, None))

    # ---- denoiser training step from the latent cache
    latent_shape = vae.latent_shape(res)
    unet = UNet(den_cfg.model).to(device, memory_format=memory_format)
    unet_step_model = torch.compile(unet) if settings.compile else unet
    schedule = NoiseSchedule.from_config(den_cfg.diffusion)
    v_loss = VPredictionLoss(schedule, self_condition=den_cfg.model.self_condition)  # plain v-MSE: min-SNR costs nothing
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    cache_batch = torch.randn(args.denoiser_batch, 2, *latent_shape, device=device).abs()

    def denoiser_step() -> None:
        z0 = sample_posterior(cache_batch).to(memory_format=memory_format)
        t = torch.randint(0, schedule.timesteps, (len(z0),), device=device)
        with autocast:
            loss = v_loss(unet_step_model, z0, t, torch.randn_like(z0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, peak = timed_with_peak(denoiser_step, 3, args.repeats, on_cuda)
    flops = count_flops(lambda: (unet(torch.randn(args.denoiser_batch, *latent_shape, device=device),
                                      torch.zeros(args.denoiser_batch, dtype=torch.long, device=device)).sum().backward()))
    unet.zero_grad(set_to_none=True)
    top = peak_tflops(name, args.peak_tflops)
    mfu = flops / seconds / (top * 1e12) if top else None
    rows.append(("denoiser train", args.denoiser_batch / seconds, peak, mfu))

    # ---- DDIM-50 sampling, decoded
    unet.eval()
    vae.eval()

    def ddim_batch() -> None:
        with torch.inference_mode(), autocast:
            z = sample(unet_step_model, schedule, (args.sample_batch, *latent_shape), sampler="ddim",
                       steps=min(50, schedule.timesteps), device=device)
            vae.decode(z)

    seconds, peak = timed_with_peak(ddim_batch, 1, max(2, args.repeats // 3), on_cuda)
    rows.append(("DDIM-50 sampling", args.sample_batch / seconds, peak, None))

    print(f"{'what':18s} {'images/s':>10s} {'peak GiB':>9s} {'MFU':>6s}")
    for what, rate, peak, mfu in rows:
        print(f"{what:18s} {rate:10.1f} {peak:9.2f} {'' if mfu is None else f'{100 * mfu:5.1f}%':>6s}")
    print(f"denoiser step: {flops / 1e9:.1f} GFLOP forward+backward at batch {args.denoiser_batch}"
          + (f"; peak {top:g} TFLOP/s" if top else "; no peak known for this device: pass --peak-tflops for MFU"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
