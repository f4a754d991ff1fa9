"""Denoiser training throughput: latent cache vs encoding on the fly vs latents in memory.

    PYTHONPATH=src python benchmarks/bench_latent_cache.py           # about 3 minutes on a 2-core CPU
    PYTHONPATH=src python benchmarks/bench_latent_cache.py --quick   # about 1 minute, fewer rounds

Three data paths feed the same training update (the one `build_denoiser_task` and the
shared loop make: t ~ U{0..T-1}, ε, z_t, v-loss with min-SNR-γ weights, backward,
grad clipping, AdamW from `make_optimizer`, EMA update, `loss.item()`):

  cache      BatchOrder.indices → LatentCache.batch → sample_posterior → LatentStats.normalize
  on-the-fly BatchOrder.indices → uint8 images[idx] → to_float → random_flip
             → frozen VAE.encode (no grad) → posterior.sample → LatentStats.normalize
  in-memory  a pre-drawn tensor of normalised latents, sliced by step (no indexing, no sampling)

cache / in-memory time is the data-pipeline overhead of the cache; on-the-fly / cache
time is the speed-up the cache buys. Two configs:

  small  configs/quickstart/{vae,denoiser}.toml: builtin:faces 32×32 → 4×8×8 latents, the
         config's batch (128). The latent cache is the real one: build_latent_cache over
         the real training set (flip on), saved and read back as safetensors like
         `load_or_build_latent_cache` does. Its build time is reported against the
         encoder time it saves per epoch.
  ffhq   configs/{vae,denoiser}.toml model shapes: 128×128 images → 4×16×16 latents. On a
         CPU these models are huge, so the batch is small (4) and steps are few. The
         images are builtin:faces drawn at 128×128; the cache has FFHQ's size (70 000
         images, 1 % held out, ×2 for flips) but holds synthetic μ, σ (encoding it would
         take hours here). Speed depends on shapes, not values.

All weights are randomly initialised (speed does not depend on training). The machine
may be shared, so the paths are interleaved: every round runs a block of updates of each
path (on-the-fly first, then cache and in-memory in alternating order), and each update
is timed on its own. Reported: median update time (steps/s = 1 / median), the ratios of
medians, and the median (min–max) of the per-round ratios, which are paired in time and
so robust to load drifting. Because a 5 % difference is below the noise of a loaded
machine, the data part of each update (everything until z0 exists) is also timed inside
the update, and on its own in a tight loop; overhead by decomposition = (cache data time
− in-memory data time, both alone) / in-memory update time.

Threads: one by default (`--threads`). On a shared 2-core machine a 2-thread update of the
small config ran ~10× slower than a 1-thread one and erratically (OpenMP barriers wait for
a descheduled thread), which hides everything else; ratios are what this script is for.

`--profile N` adds a torch.profiler table of N cache-path updates (self CPU time per op),
to see where an overhead goes.

No assertions: the script prints what it measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ldm_cli.config import DenoiserRunConfig, VAERunConfig, load_config, packaged_config
from ldm_cli.data.pixels import random_flip, to_float
from ldm_cli.data.prepare import load_images
from ldm_cli.diffusion.parametrization import VPredictionLoss
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.models.latent_stats import LatentStats, stats_of_posterior_samples
from ldm_cli.models.unet import UNet
from ldm_cli.models.vae import VAE
from ldm_cli.training.distributed import BatchOrder
from ldm_cli.training.latent_cache import LatentCache, build_latent_cache, sample_posterior
from ldm_cli.training.optim import make_ema, make_optimizer, max_grad_norm

PATHS = ("cache", "on-the-fly", "in-memory")


# --------------------------------------------------------------------------- the update


@dataclass
class Setup:
    """Everything one config's three paths share."""

    name: str
    batch: int
    den: DenoiserRunConfig
    vae: VAE
    unet: UNet
    schedule: NoiseSchedule
    stats: LatentStats
    cache: LatentCache
    images: torch.Tensor  # uint8 (N, 3, H, W), as load_images gives
    in_memory: torch.Tensor  # (K·B, C, h, w) normalised latents
    notes: list[str] = field(default_factory=list)


class Trainer:
    """One UNet, optimizer and EMA, stepped by any of the three data paths."""

    def __init__(self, s: Setup):
        self.s = s
        self.optimizer = make_optimizer(s.unet, s.den.optim)
        self.ema = make_ema(s.unet, s.den.train)
        self.clip = max_grad_norm(s.den.optim)
        self.v_loss = VPredictionLoss(s.schedule, s.den.diffusion.min_snr_gamma, s.den.model.self_condition)
        seed = s.den.train.seed
        self.orders = {
            "cache": BatchOrder(len(s.cache), s.batch, 1, 1, 0, seed),
            "on-the-fly": BatchOrder(len(s.images), s.batch, 1, 1, 0, seed),
        }
        self.steps = {path: 0 for path in PATHS}
        self.in_memory_batches = len(s.in_memory) // s.batch
        s.unet.train()

    # -- the data part of each path: everything until the clean latents z0 exist

    def data_cache(self, step: int) -> torch.Tensor:
        batch = self.s.cache.batch(self.orders["cache"].indices(step, 0)).to("cpu", non_blocking=True)
        return self.s.stats.normalize(sample_posterior(batch.float()))

    def data_on_the_fly(self, step: int) -> torch.Tensor:
        batch = self.s.images[self.orders["on-the-fly"].indices(step, 0)].to("cpu", non_blocking=True)
        x = to_float(batch)
        if self.s.den.data.flip:
            x = random_flip(x)
        with torch.no_grad():
            return self.s.stats.normalize(self.s.vae.encode(x).sample())

    def data_in_memory(self, step: int) -> torch.Tensor:
        start = (step % self.in_memory_batches) * self.s.batch
        return self.s.in_memory[start : start + self.s.batch]

    def data(self, path: str) -> Callable[[int], torch.Tensor]:
        return {"cache": self.data_cache, "on-the-fly": self.data_on_the_fly, "in-memory": self.data_in_memory}[path]

    # -- the update itself, as the denoiser task's loss() and the shared loop do it

    def update(self, z0: torch.Tensor) -> float:
        unet = self.s.unet
        t = torch.randint(0, self.s.schedule.timesteps, (len(z0),), device=z0.device)
        loss = self.v_loss(unet, z0, t, torch.randn_like(z0))
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), self.clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(unet)
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def step(self, path: str) -> tuple[float, float]:
        """One update along `path`: (seconds in the data part, seconds in all)."""
        step = self.steps[path]
        start = time.perf_counter()
        z0 = self.data(path)(step)
        data_done = time.perf_counter()
        self.update(z0)
        end = time.perf_counter()
        self.steps[path] = step + 1
        return data_done - start, end - start


# --------------------------------------------------------------------------- measuring


@dataclass
class Timings:
    step: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    data: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    rounds: list[dict[str, float]] = field(default_factory=list)  # per round: median step time per path
    alone: dict[str, float] = field(default_factory=dict)  # data part alone, tight loop, median seconds


def measure(trainer: Trainer, rounds: int, steps: dict[str, int], warmup: int, data_reps: dict[str, int]) -> Timings:
    timings = Timings()
    alone_rounds: dict[str, list[float]] = {p: [] for p in PATHS}
    for path in PATHS:  # warm-up: oneDNN primitives, allocator, optimizer state
        for _ in range(warmup):
            trainer.step(path)
    for r in range(rounds):
        # on-the-fly first, then cache and in-memory in alternating order: each of those two
        # follows the encoder's big allocations (and each other) equally often, and the
        # two are always adjacent, so their per-round ratio is paired in time
        order = ("on-the-fly", "cache", "in-memory") if r % 2 == 0 else ("on-the-fly", "in-memory", "cache")
        per_round = {}
        for path in order:
            times = [trainer.step(path) for _ in range(steps[path])]
            timings.data[path] += [d for d, _ in times]
            timings.step[path] += [s for _, s in times]
            per_round[path] = statistics.median(s for _, s in times)
        timings.rounds.append(per_round)
        # the data part alone, between rounds so that it sees the same load
        for path in PATHS:
            if data_reps[path] == 0:
                continue
            fn, first = trainer.data(path), trainer.steps[path]
            samples = []
            for i in range(data_reps[path]):
                start = time.perf_counter()
                fn(first + i)
                samples.append(time.perf_counter() - start)
            alone_rounds[path].append(statistics.median(samples))
    timings.alone = {path: statistics.median(v) for path, v in alone_rounds.items() if v}
    return timings


def ratio_stats(rounds: list[dict[str, float]], num: str, den: str) -> tuple[float, float, float]:
    values = [r[num] / r[den] for r in rounds]
    return statistics.median(values), min(values), max(values)


def report(setup: Setup, t: Timings, steps: dict[str, int], rounds: int) -> dict[str, float]:
    med = {p: statistics.median(t.step[p]) for p in PATHS}
    data_med = {p: statistics.median(t.data[p]) for p in PATHS}
    print(f"\n[{setup.name}] batch {setup.batch}, {rounds} rounds × steps per block "
          + ", ".join(f"{p} {steps[p]}" for p in PATHS)
          + " = " + ", ".join(f"{len(t.step[p])}" for p in PATHS) + " timed updates")
    for note in setup.notes:
        print(f"  {note}")
    print(f"  {'config':<7} {'path':<11} {'steps/s':>8} {'s/step':>8} {'min s':>7} {'max s':>7}"
          f" {'data ms (in step)':>17} {'data ms (alone)':>15} {'data/step':>9}")
    for p in PATHS:
        alone = t.alone.get(p)
        alone_txt = f"{alone * 1e3:15.3f}" if alone is not None else f"{'-':>15}"
        print(f"  {setup.name:<7} {p:<11} {1 / med[p]:8.3f} {med[p]:8.3f} {min(t.step[p]):7.3f} {max(t.step[p]):7.3f}"
              f" {data_med[p] * 1e3:17.3f} {alone_txt} {data_med[p] / med[p]:9.1%}")
    speedup = med["on-the-fly"] / med["cache"]
    s_med, s_lo, s_hi = ratio_stats(t.rounds, "on-the-fly", "cache")
    over = med["cache"] / med["in-memory"] - 1
    o_med, o_lo, o_hi = ratio_stats(t.rounds, "cache", "in-memory")
    # decomposition: extra data work of the cache path over the in-memory path, per update
    extra = (t.alone.get("cache", data_med["cache"]) - t.alone.get("in-memory", data_med["in-memory"]))
    over_dec = extra / med["in-memory"]
    enc_share = (data_med["on-the-fly"]) / med["on-the-fly"]
    print(f"  speed-up, cache vs on-the-fly (on-the-fly s/step ÷ cache s/step): {speedup:.2f}×"
          f"   per-round median {s_med:.2f}× (min {s_lo:.2f}, max {s_hi:.2f});"
          f" encoding is {enc_share:.0%} of an on-the-fly update")
    print(f"  overhead, cache vs in-memory (cache s/step ÷ in-memory s/step − 1): {over:+.1%}"
          f"   per-round median {o_med - 1:+.1%} (min {o_lo - 1:+.1%}, max {o_hi - 1:+.1%})")
    print(f"  overhead by decomposition ((cache data − in-memory data, timed alone) ÷ in-memory s/step):"
          f" {over_dec:+.2%}  ({extra * 1e3:.3f} ms of {med['in-memory'] * 1e3:.0f} ms)")
    return {"speedup": speedup, "overhead": over, "overhead_dec": over_dec, **{f"s_{p}": med[p] for p in PATHS},
            "data_cache": data_med["cache"], "data_otf": data_med["on-the-fly"]}


def profile(trainer: Trainer, steps: int) -> None:
    """Self CPU time per op over `steps` cache-path updates, the data part marked apart."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    trainer.step("cache")  # warm
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step = trainer.steps["cache"]
            with record_function("DATA: cache.batch + sample_posterior + normalize"):
                z0 = trainer.data_cache(step)
            with record_function("UPDATE: noise + unet + loss + backward + adamw + ema"):
                trainer.update(z0)
            trainer.steps["cache"] = step + 1
    print(f"\n  profile of {steps} cache-path updates ({trainer.s.name}), top ops by self CPU time:")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
    print("\n".join("  " + line for line in table.splitlines()))
    marks = [e for e in prof.key_averages() if e.key.startswith(("DATA:", "UPDATE:"))]
    for e in marks:
        print(f"  {e.key:<60} {e.cpu_time_total / 1e3 / steps:10.3f} ms per update")


# --------------------------------------------------------------------------- the two configs


def models(vae_toml: str, den_toml: str) -> tuple[VAERunConfig, DenoiserRunConfig, VAE, UNet]:
    vae_cfg = load_config(VAERunConfig, packaged_config(vae_toml))
    den_cfg = load_config(DenoiserRunConfig, packaged_config(den_toml))
    vae = VAE(vae_cfg.model).eval().requires_grad_(False)  # frozen, as load_vae gives it
    unet = UNet(den_cfg.model)
    shape = vae.latent_shape(den_cfg.data.resolution)
    wanted = (den_cfg.model.latent_channels, den_cfg.model.latent_size, den_cfg.model.latent_size)
    assert tuple(shape) == wanted, (shape, wanted)  # the pairing `check_latent_shape` insists on
    return vae_cfg, den_cfg, vae, unet


def model_sizes(vae: torch.nn.Module, unet: torch.nn.Module) -> str:
    """One line with both models' parameter counts."""
    def millions(m: torch.nn.Module) -> float:
        return sum(p.numel() for p in m.parameters()) / 1e6
    return f"VAE {millions(vae):.2f} M params, UNet {millions(unet):.2f} M params, random weights"


def in_memory_latents(stats: LatentStats, cache: LatentCache, batches: int, batch: int) -> torch.Tensor:
    """Pre-drawn, normalised posterior samples of the first rows of the cache."""
    rows = min(len(cache), batches * batch)
    z = stats.normalize(sample_posterior(cache.batch(torch.arange(rows))))
    return z.contiguous()


def small_setup(args: argparse.Namespace, tmp: Path) -> tuple[Setup, dict[str, float]]:
    _, den, vae, unet = models("quickstart/vae.toml", "quickstart/denoiser.toml")
    batch = args.small_batch or den.train.batch_size
    data_cfg = den.data.model_copy(update={"cache_dir": str(tmp / "images")})
    start = time.perf_counter()
    images = load_images(data_cfg)
    load_s = time.perf_counter() - start
    # the real cache: every training image and its mirror, encoded once, saved and read
    # back as `load_or_build_latent_cache` does
    start = time.perf_counter()
    built = build_latent_cache(vae, images.train, den.latents.encode_batch_size, "cpu", den.data.flip)
    build_s = time.perf_counter() - start
    path = tmp / "latent-cache.safetensors"
    save_file({"mean": built.mean.contiguous(), "std": built.std.contiguous()}, str(path))
    tensors = load_file(str(path))
    cache = LatentCache(mean=tensors["mean"], std=tensors["std"])
    stats = stats_of_posterior_samples(cache.mean, cache.std, torch.Generator().manual_seed(den.train.seed))
    setup = Setup(
        name="small", batch=batch, den=den, vae=vae, unet=unet, schedule=NoiseSchedule.from_config(den.diffusion),
        stats=stats, cache=cache, images=images.train,
        in_memory=in_memory_latents(stats, cache, args.memory_batches, batch),
        notes=[
            f"builtin:faces {data_cfg.resolution}×{data_cfg.resolution}, {len(images.train)} training images "
            f"(decoded in {load_s:.1f} s); latent cache {tuple(cache.mean.shape)} ×2 (μ, σ) float32 = "
            f"{2 * cache.mean.numel() * 4 / 2**20:.1f} MiB, really encoded",
            model_sizes(vae, unet),
        ],
    )
    return setup, {"build_s": build_s, "train_images": len(images.train), "cache_rows": len(cache)}


def ffhq_setup(args: argparse.Namespace, tmp: Path) -> Setup:
    _, den, vae, unet = models("vae.toml", "denoiser.toml")
    batch = args.ffhq_batch
    res = den.data.resolution
    # FFHQ itself is not here: builtin:faces drawn at FFHQ's resolution stand in for its images
    data_cfg = den.data.model_copy(update={"source": "builtin:faces", "builtin_size": args.ffhq_images_drawn,
                                           "cache_dir": str(tmp / "images")})
    images = load_images(data_cfg)
    # a cache of FFHQ's size (μ and σ of every training image and its mirror), synthetic values
    n_train = args.ffhq_size - round(args.ffhq_size * den.data.holdout_fraction)
    rows = n_train * (2 if den.data.flip else 1)
    shape = vae.latent_shape(res)
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn((rows, *shape), generator=generator)
    std = torch.empty((rows, *shape)).uniform_(0.05, 0.5, generator=generator)
    cache = LatentCache(mean=mean, std=std)
    sample_rows = torch.randperm(rows, generator=generator)[:4096]
    stats = stats_of_posterior_samples(mean[sample_rows], std[sample_rows], torch.Generator().manual_seed(0))
    return Setup(
        name="ffhq", batch=batch, den=den, vae=vae, unet=unet, schedule=NoiseSchedule.from_config(den.diffusion),
        stats=stats, cache=cache, images=images.train,
        in_memory=in_memory_latents(stats, cache, args.memory_batches, batch),
        notes=[
            f"configs/vae.toml + configs/denoiser.toml models at {res}×{res}"
            f" → {shape[0]}×{shape[1]}×{shape[2]} latents;"
            f" batch {batch} instead of the config's {den.train.batch_size} (CPU)",
            model_sizes(vae, unet),
            f"images: {len(images.train)} builtin:faces at {res}×{res} stand in for FFHQ; latent cache of FFHQ's size "
            f"{tuple(mean.shape)} ×2 (μ, σ) = {2 * mean.numel() * 4 / 2**30:.2f} GiB with synthetic values",
        ],
    )


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (about a minute)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU, more threads stall in OpenMP barriers)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds for the small config")
    parser.add_argument("--small-batch", type=int, default=None, help="default: the quickstart config's batch")
    parser.add_argument("--small-steps", type=int, default=None, help="timed updates per path per round (1)")
    parser.add_argument("--ffhq-rounds", type=int, default=None)
    parser.add_argument("--ffhq-batch", type=int, default=4)
    parser.add_argument("--ffhq-steps", type=int, default=None,
                        help="timed updates per round of cache and in-memory (2); on-the-fly does 1")
    parser.add_argument("--ffhq-size", type=int, default=70_000, help="images of the (synthetic) FFHQ cache")
    parser.add_argument("--ffhq-images-drawn", type=int, default=32, help="builtin:faces drawn at 128×128")
    parser.add_argument("--memory-batches", type=int, default=16, help="distinct batches in the in-memory tensor")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N cache-path updates of each config (torch.profiler)")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--skip-ffhq", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (6 if args.quick else 16)
    small_steps = args.small_steps or 1
    ffhq_rounds = args.ffhq_rounds or (2 if args.quick else 6)
    ffhq_steps = args.ffhq_steps or 2
    torch.manual_seed(0)
    began = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    print("steps/s = 1 / median seconds per update; 'data' = the part of an update until z0 exists")

    with tempfile.TemporaryDirectory(prefix="bench-latent-cache-") as tmp_name:
        tmp = Path(tmp_name)
        results = {}
        if not args.skip_small:
            setup, build = small_setup(args, tmp)
            steps = {"cache": small_steps, "on-the-fly": small_steps, "in-memory": small_steps}
            reps = {"cache": 50, "on-the-fly": 0, "in-memory": 50}
            timings = measure(Trainer(setup), rounds, steps, warmup=1, data_reps=reps)
            results["small"] = report(setup, timings, steps, rounds)
            if args.profile:
                profile(Trainer(setup), args.profile)
            r = results["small"]
            n, b = build["train_images"], setup.batch
            per_epoch_updates = n // b
            saved_steps = per_epoch_updates * (r["s_on-the-fly"] - r["s_cache"])
            saved_per_epoch = per_epoch_updates * (r["data_otf"] - r["data_cache"])  # the data parts: less noisy
            print("\n[small] one-time cost of the cache vs what it saves")
            print(f"  build_latent_cache: {build['build_s']:.1f} s to encode {n} training images"
                  f"{' and their mirrors' if setup.den.data.flip else ''} ({build['cache_rows']} rows,"
                  f" encode batch {setup.den.latents.encode_batch_size})")
            rows = build["cache_rows"]
            print(f"  = {build['build_s'] / rows * 1e3:.2f} ms per encoded image; encoding on the fly costs"
                  f" {r['data_otf'] / b * 1e3:.2f} ms per image (to_float, flip, encode, sample, normalise)")
            print(f"  an epoch ({n} images = {per_epoch_updates} updates of {b}) saves {saved_per_epoch:.1f} s"
                  " of data work"
                  f" (on-the-fly data part − cache data part); from the step-time medians: {saved_steps:.1f} s")
            if saved_per_epoch > 0:
                be = build["build_s"] / saved_per_epoch
                total_epochs = setup.den.train.max_steps * b / n
                net = total_epochs * saved_per_epoch - build["build_s"]
                print(f"  the build pays for itself after {be:.1f} epochs; the quickstart run"
                      f" ({setup.den.train.max_steps} updates = {total_epochs:.0f} epochs) saves ≈ {net:.0f} s net")
            print("  note: with latents.cache = false build_denoiser_task still encodes the training set once"
                  " (encode_posteriors, for the latent statistics), so the cache's extra one-time cost is the"
                  " mirrored half only")
            del setup, timings
        if not args.skip_ffhq:
            setup = ffhq_setup(args, tmp)
            steps = {"cache": ffhq_steps, "on-the-fly": 1, "in-memory": ffhq_steps}
            reps = {"cache": 50, "on-the-fly": 0, "in-memory": 50}
            timings = measure(Trainer(setup), ffhq_rounds, steps, warmup=1, data_reps=reps)
            results["ffhq"] = report(setup, timings, steps, ffhq_rounds)
            if args.profile:
                profile(Trainer(setup), args.profile)
            del setup, timings

    print("\nsummary (targets: speed-up ≥ 1.5× where the encoder is a real part of the step; overhead ≤ 5 %)")
    print(f"  {'config':<7} {'cache steps/s':>13} {'on-the-fly':>10} {'in-memory':>9} {'speed-up':>8}"
          f" {'overhead':>8} {'overhead (decomp.)':>18}")
    for name, r in results.items():
        print(f"  {name:<7} {1 / r['s_cache']:13.3f} {1 / r['s_on-the-fly']:10.3f} {1 / r['s_in-memory']:9.3f}"
              f" {r['speedup']:7.2f}× {r['overhead']:+8.1%} {r['overhead_dec']:+18.2%}")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
