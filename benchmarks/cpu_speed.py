"""What makes the quickstart models fast on a CPU: ratios measured in one run.

    python benchmarks/cpu_speed.py                      # about 3 minutes on a 2-core CPU
    python benchmarks/cpu_speed.py --den-set model.base_channels=48

1. Training: milliseconds per update (forward, backward, AdamW) of the quickstart VAE
   and denoiser on random batches of their config's size, with torch threads 1 and 2,
   channels-last memory, torch.compile and bfloat16 autocast.
2. Sampling: DDIM-50 seconds per image for 500 images (`sample_in_batches`, as `ldm
   sample` runs it) at several batch sizes, threads 1 and 2, channels-last, compile and
   bfloat16 autocast; the model call under torch.inference_mode against torch.no_grad.
3. The sampler overhead ratio: the sampling time over 50 × (batches) × the time of one
   model call at that batch: 1.00 means the loop costs nothing beyond the model.
4. FLOPs of one forward pass per image (torch's FlopCounterMode) and the rate reached,
   against the rate of a large float32 matrix product on this CPU: how far a faster
   implementation of the same model could go.
5. Attention: softmax(q·kᵀ/√d)·v written out against torch's fused kernel, at the
   quickstart model's 16 tokens (training: float32 forward and backward; sampling:
   bfloat16 forward) and at longer sequences: where `models.unet.attention` switches.
6. The optimiser: one AdamW step over each model's parameters, torch's per-tensor loop
   against its foreach and fused kernels, and the step's share of a whole update:
   why `training.optim.make_optimizer` asks for the fused kernel.

Each time is the median of several repeats after a warm-up. No assertions: it prints
what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from torch.nn import functional as F

from ldm_cli.common.device import has_native_bf16, model_in_precision
from ldm_cli.config import DenoiserRunConfig, VAERunConfig, load_config, packaged_config
from ldm_cli.diffusion.sampling import sample_in_batches
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.models.unet import SHORT_SEQUENCE, UNet, attention, written_out_attention
from ldm_cli.models.vae import VAE
from ldm_cli.training.budget import denoiser_update, forward_autocast, median_seconds, prepared, vae_update

NUM_IMAGES = 500
STEPS = 50


# --------------------------------------------------------------------------- 1. training


def training_table(vae_cfg: VAERunConfig, den_cfg: DenoiserRunConfig, threads: list[int], repeats: int) -> None:
    print("\n1. training, ms per update (median)")
    print(f"{'setting':<34}{'VAE':>10}{'denoiser':>10}")
    base = None
    for n in threads:
        for channels_last, compiled, bf16 in ((False, False, False), (True, False, False), (False, True, False),
                                              (False, False, True)):
            torch.set_num_threads(n)
            name = (f"threads {n}" + (", channels-last" if channels_last else "") + (", compile" if compiled else "")
                    + (", bf16 autocast" if bf16 else ""))
            vae_ms = 1000 * median_seconds(vae_update(vae_cfg, channels_last, compiled, bf16), repeats, warmup=3)
            den_ms = 1000 * median_seconds(denoiser_update(den_cfg, channels_last, compiled, bf16), repeats, warmup=3)
            base = base or (vae_ms, den_ms)
            print(f"{name:<34}{vae_ms:>10.1f}{den_ms:>10.1f}   ratio to first row {vae_ms / base[0]:.2f} / "
                  f"{den_ms / base[1]:.2f}", flush=True)


# --------------------------------------------------------------------------- 2 and 3. sampling


def sampling_seconds(model: torch.nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], batch: int,
                     bf16: bool = False, precision: str = "fp32") -> float:
    """Wall seconds of DDIM sampling; `bf16`: under autocast; `precision`: as `ldm sample --precision`."""
    start = time.perf_counter()
    with forward_autocast(bf16):
        for _ in sample_in_batches(model, schedule, NUM_IMAGES, shape, batch, 0, sampler="ddim", steps=STEPS,
                                   precision=precision):
            pass
    return time.perf_counter() - start


def call_seconds(model: torch.nn.Module, shape: tuple[int, ...], batch: int, repeats: int,
                 mode: Callable[[], object] = torch.inference_mode, bf16: bool = False) -> float:
    z = torch.randn(batch, *shape)
    t = torch.full((batch,), 500, dtype=torch.long)

    def call() -> None:
        with mode(), forward_autocast(bf16):
            model(z, t)
    return median_seconds(call, repeats)


def sampling_table(den_cfg: DenoiserRunConfig, threads: list[int], batches: list[int], repeats: int) -> None:
    torch.manual_seed(0)
    unet = UNet(den_cfg.model).eval()
    m = den_cfg.model
    shape = (m.latent_channels, m.latent_size, m.latent_size)
    schedule = NoiseSchedule.from_config(den_cfg.diffusion)
    print(f"\n2-3. DDIM-{STEPS} sampling of {NUM_IMAGES} images")
    print(f"{'setting':<40}{'s / image':>11}{'overhead':>10}")
    for n in threads:
        torch.set_num_threads(n)
        for batch in batches:
            seconds = sampling_seconds(unet, schedule, shape, batch)
            calls = -(-NUM_IMAGES // batch) * STEPS
            model_only = calls * call_seconds(unet, shape, batch, repeats)
            print(f"{f'threads {n}, batch {batch}':<40}{seconds / NUM_IMAGES:>11.4f}{seconds / model_only:>10.3f}",
                  flush=True)
    torch.set_num_threads(max(threads))
    batch = max(batches)
    channels_last = prepared(UNet(m).eval(), True, False)
    for name, model, bf16, precision in (("channels-last", channels_last, False, "fp32"),
                                         ("compile", prepared(UNet(m).eval(), False, True), False, "fp32"),
                                         ("bf16 autocast", unet, True, "fp32"),
                                         ("channels-last, bf16 autocast", channels_last, True, "fp32"),
                                         ("channels-last, bf16 copy", channels_last, False, "bf16")):
        with torch.inference_mode(), forward_autocast(bf16):  # compiles before the clock starts
            model(torch.randn(batch, *shape), torch.full((batch,), 500, dtype=torch.long))
        seconds = sampling_seconds(model, schedule, shape, batch, bf16, precision)
        print(f"{f'threads {max(threads)}, batch {batch}, {name}':<40}{seconds / NUM_IMAGES:>11.4f}", flush=True)
    inference = call_seconds(unet, shape, batch, repeats, torch.inference_mode)
    no_grad = call_seconds(unet, shape, batch, repeats, torch.no_grad)
    print(f"model call, batch {batch}: inference_mode {1000 * inference:.1f} ms, no_grad {1000 * no_grad:.1f} ms "
          f"(ratio {no_grad / inference:.3f})")


# --------------------------------------------------------------------------- 4. FLOPs


def flop_table(den_cfg: DenoiserRunConfig, threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    m = den_cfg.model
    unet = UNet(m).eval()
    batch = 250
    z, t = torch.randn(batch, m.latent_channels, m.latent_size, m.latent_size), torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(z, t)
    flops = counter.get_total_flops() / batch
    call = call_seconds(unet, tuple(z.shape[1:]), batch, repeats)
    a = torch.randn(2048, 2048)
    matmul = median_seconds(lambda: a @ a, repeats)
    peak = 2 * 2048**3 / matmul
    reached = flops * batch / call
    print(f"\n4. FLOPs (threads {threads})")
    print(f"denoiser forward: {flops / 1e6:.1f} MFLOP per image, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M "
          f"parameters; DDIM-{STEPS}: {STEPS * flops / 1e9:.2f} GFLOP per image")
    print(f"rate reached by the model at batch {batch}: {reached / 1e9:.0f} GFLOP/s; float32 matmul 2048²: "
          f"{peak / 1e9:.0f} GFLOP/s (ratio {reached / peak:.2f})")
    print(f"DDIM-{STEPS} at the matmul rate would take {STEPS * flops / peak:.4f} s per image, "
          f"DPM++-20 {20 * flops / peak:.4f}")
    if not has_native_bf16("cpu"):
        print("bf16: not native on this CPU (neither AVX512-BF16 nor AMX), so not measured: emulated, it is slower")
        return
    a16 = a.to(torch.bfloat16)
    peak16 = 2 * 2048**3 / median_seconds(lambda: a16 @ a16, repeats)
    autocast16 = flops * batch / call_seconds(unet, tuple(z.shape[1:]), batch, repeats, bf16=True)
    unet = unet.to(memory_format=torch.channels_last)
    copy16 = flops * batch / call_seconds(model_in_precision(unet, "bf16"), tuple(z.shape[1:]), batch, repeats)
    print(f"bf16: rate reached by the model under autocast {autocast16 / 1e9:.0f} GFLOP/s, as a channels-last bf16 "
          f"copy {copy16 / 1e9:.0f} GFLOP/s; bf16 matmul 2048²: {peak16 / 1e9:.0f} GFLOP/s (ratio "
          f"{copy16 / peak16:.2f}); DDIM-{STEPS} at the bf16 matmul rate would take {STEPS * flops / peak16:.4f} s per "
          f"image, DPM++-20 {20 * flops / peak16:.4f}")


# --------------------------------------------------------------------------- 5. attention


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def attention_seconds(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      repeats: int) -> float:
    """Median seconds of `fn(q, k, v)`: forward and backward when q requires a gradient, else forward only."""
    if q.requires_grad:
        return median_seconds(lambda: fn(q, k, v).sum().backward(), repeats)
    with torch.inference_mode():
        return median_seconds(lambda: fn(q, k, v), repeats)


def attention_table(threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    heads, head_dim = 4, 32  # the quickstart model's attention: 128 channels in 4 heads
    print(f"\n5. Attention, {heads} heads of {head_dim} (threads {threads}); `attention` writes the product out "
          f"for sampling (no gradient) up to {SHORT_SEQUENCE} tokens")
    print(f"{'case':<44}{'fused ms':>10}{'written out ms':>16}{'ratio':>8}  attention uses")
    cases = (("training, batch 32, 16 tokens, fp32", 32, 16, torch.float32, True),
             ("training, batch 32, 16 tokens, bf16", 32, 16, torch.bfloat16, True),
             ("sampling, batch 250, 16 tokens, fp32", 250, 16, torch.float32, False),
             ("sampling, batch 250, 16 tokens, bf16", 250, 16, torch.bfloat16, False),
             ("sampling, batch 250, 64 tokens, bf16", 250, 64, torch.bfloat16, False),
             ("sampling, batch 8, 1024 tokens, bf16", 8, 1024, torch.bfloat16, False))
    for name, batch, tokens, dtype, backward in cases:
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, dtype=dtype, requires_grad=backward) for _ in range(3))
        fused = attention_seconds(fused_attention, q, k, v, repeats)
        written = attention_seconds(written_out_attention, q, k, v, repeats)
        chosen = "written out" if torch.equal(attention(q, k, v), written_out_attention(q, k, v)) else "fused"
        print(f"{name:<44}{1000 * fused:>10.2f}{1000 * written:>16.2f}{fused / written:>8.2f}  {chosen}", flush=True)


# --------------------------------------------------------------------------- 6. optimiser


def adamw_step_seconds(model: torch.nn.Module, kernel: str, repeats: int) -> float:
    """Median seconds of one AdamW step (random gradients) with torch's `kernel`."""
    options = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kernel]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **options)
    return median_seconds(optimizer.step, repeats, warmup=3)


def per_tensor(cfg: VAERunConfig | DenoiserRunConfig) -> VAERunConfig | DenoiserRunConfig:
    """`cfg` with `optim.fused = false`: the update as it ran with torch's per-tensor loop."""
    return cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"fused": False})})


def optimizer_table(vae_cfg: VAERunConfig, den_cfg: DenoiserRunConfig, threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    print(f"\n6. AdamW step, ms (threads {threads}); share: of a whole update with the per-tensor step "
          f"(fp32, channels-last)")
    print(f"{'model':<10}{'tensors':>8}{'per-tensor':>12}{'foreach':>10}{'fused':>8}"
          f"{'per-tensor / fused':>20}{'share':>8}")
    for name, model, update in (("VAE", VAE(vae_cfg.model), vae_update(per_tensor(vae_cfg), True, False)),
                                ("denoiser", UNet(den_cfg.model), denoiser_update(per_tensor(den_cfg), True, False))):
        ms = {kernel: 1000 * adamw_step_seconds(model, kernel, repeats * 3)
              for kernel in ("per-tensor", "foreach", "fused")}
        update_ms = 1000 * median_seconds(update, repeats, warmup=3)
        print(f"{name:<10}{len(list(model.parameters())):>8}{ms['per-tensor']:>12.2f}{ms['foreach']:>10.2f}"
              f"{ms['fused']:>8.2f}{ms['per-tensor'] / ms['fused']:>20.2f}{ms['per-tensor'] / update_ms:>8.1%}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-config", type=Path, default=packaged_config("quickstart/vae.toml"))
    parser.add_argument("--den-config", type=Path, default=packaged_config("quickstart/denoiser.toml"))
    parser.add_argument("--vae-set", action="append", default=[])
    parser.add_argument("--den-set", action="append", default=[])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[50, 125, 250, 500])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["training", "sampling", "flops", "attention", "optimizer"])
    args = parser.parse_args()
    vae_cfg = load_config(VAERunConfig, args.vae_config, args.vae_set)
    den_cfg = load_config(DenoiserRunConfig, args.den_config, args.den_set)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads by default; denoiser "
          f"{den_cfg.model.base_channels}×{den_cfg.model.channel_mults}, {den_cfg.model.blocks_per_level} blocks/level")
    if "training" not in args.skip:
        training_table(vae_cfg, den_cfg, args.threads, args.repeats)
    if "sampling" not in args.skip:
        sampling_table(den_cfg, args.threads, args.batches, args.repeats)
    if "flops" not in args.skip:
        flop_table(den_cfg, max(args.threads), args.repeats)
    if "attention" not in args.skip:
        attention_table(max(args.threads), args.repeats)
    if "optimizer" not in args.skip:
        optimizer_table(vae_cfg, den_cfg, max(args.threads), args.repeats)


if __name__ == "__main__":
    main()
