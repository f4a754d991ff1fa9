"""Measure the samplers as ratios: loop overhead, relative wall time, and memory.

    python benchmarks/bench_samplers.py            # about a minute on a 2-core CPU

1. Overhead: time of a sampling run / (model calls × time of one model call), with a
   small conv model (two 3×3 convolutions on 4×8×8 latents, batch 64). 1.00 means
   the loop costs nothing beyond the model; the sampler steps, the noise and the
   Python loop make up the rest. Each run is timed a few times, interleaved with the
   model-only timing, and the fastest of each is kept (the machine may be shared).
   The call time is measured inside the run (steady when the machine's load
   changes) and on its own; "own us/step" times the run with a model that costs
   nothing, i.e. the sampler's own work per step. The two call times can differ by
   2x: with glibc malloc the conv's 1 MiB activation is sometimes served by fresh
   mmap pages (page faults) and sometimes reused, depending on what else allocates.
2. Wall time for the same images: DDPM-1000 vs DDIM-50 vs DPM-Solver++(2M)-20.
3. Peak memory of `sample_in_batches` for 1000 images vs 100 at the same batch size,
   each in a fresh subprocess (ru_maxrss, the peak resident set). A control run that
   keeps every batch shows what growth with the number of images would look like.

No assertions: the script prints what it measured. Timings use one thread by default
(`--threads`) because tiny tensors gain nothing from more and a shared machine makes
multi-threaded timings erratic.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ldm_cli.diffusion.sampling import sample, sample_in_batches
from ldm_cli.diffusion.schedules import NoiseSchedule


class TinyDenoiser(nn.Module):
    """Two 3×3 convolutions; stands in for the U-Net (t is ignored)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, channels, 3, padding=1)
        )

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs of fn, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def model_call_time(model: nn.Module, z: torch.Tensor, calls: int) -> float:
    """Seconds per model call, averaged over ``calls`` calls under inference_mode."""
    t = torch.zeros(z.shape[0], dtype=torch.long)
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(calls):
            model(z, t)
        return (time.perf_counter() - start) / calls


# --------------------------------------------------------------------------- 1 and 2


class TimedModel:
    """Wraps a model and adds up the time spent inside its calls."""

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.model, self.seconds, self.calls = model, 0.0, 0

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(z, t)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def run_speed(args: argparse.Namespace) -> None:
    schedule = NoiseSchedule.create("cosine", args.timesteps)
    model = TinyDenoiser(args.channels, args.hidden).eval()
    shape = (args.batch, args.channels, args.size, args.size)
    z = torch.randn(shape)
    v_fixed = torch.randn(shape)
    model_call_time(model, z, 20)  # warm-up (oneDNN primitives, allocator)

    def null_model(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v_fixed  # costs nothing: a run with it times the sampler's own work

    def run(net: Callable, sampler: str, steps: int | None, per_sample: bool) -> float:
        start = time.perf_counter()
        if per_sample:
            options = dict(sampler=sampler, steps=steps)
            for _ in sample_in_batches(net, schedule, args.batch, shape[1:], args.batch, seed=0, **options):
                pass
        else:
            sample(net, schedule, shape, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start

    runs = [("ddpm", None, False), ("ddpm", None, True), ("ddim", 50, False), ("dpm++2m", 20, False)]
    threads = torch.get_num_threads()
    print(f"model: 2 convs {args.channels}->{args.hidden}->{args.channels}, latents {shape}, {threads} thread(s)")
    print("overhead = run time / (model calls x time of one call), the call timed inside the run or on its own")
    print(
        f"{'sampler':<8} {'noise from':<16} {'calls':>5} {'run s':>6} {'call ms':>8} {'alone ms':>8}"
        f" {'own us/step':>11} {'overhead':>8} {'vs alone':>8}"
    )
    results: dict[str, float] = {}
    for sampler, steps, per_sample in runs:
        calls = args.timesteps if steps is None else steps
        best: tuple[float, float] = (float("inf"), 0.0)  # (run s, s inside the model) of the fastest run
        alone_s = own_s = float("inf")
        for _ in range(args.repeats):  # interleaved, so all three see similar machine load
            timed = TimedModel(model)
            best = min(best, (run(timed, sampler, steps, per_sample), timed.seconds))
            alone_s = min(alone_s, model_call_time(model, z, min(calls, 200)))
            own_s = min(own_s, run(null_model, sampler, steps, per_sample))
        run_s, in_model_s = best
        noise = "per-sample gens" if per_sample else "one generator"
        print(
            f"{sampler:<8} {noise:<16} {calls:>5} {run_s:>6.2f} {in_model_s / calls * 1e3:>8.3f} {alone_s * 1e3:>8.3f}"
            f" {own_s / calls * 1e6:>11.1f} {run_s / in_model_s:>8.3f} {run_s / (calls * alone_s):>8.3f}"
        )
        if not per_sample:
            results[sampler] = run_s
    noise_s = best_time(lambda: [torch.randn(shape) for _ in range(200)], args.repeats) / 200
    print(f"(one batch of noise takes {noise_s * 1e6:.0f} us to draw; DDPM draws one every step)")

    print()
    print("wall time for the same images (ratios):")
    print(f"  DDPM-{args.timesteps} / DDIM-50        {results['ddpm'] / results['ddim']:7.2f}")
    print(f"  DDIM-50 / DPM++2M-20        {results['ddim'] / results['dpm++2m']:7.2f}")
    print(f"  DDPM-{args.timesteps} / DPM++2M-20     {results['ddpm'] / results['dpm++2m']:7.2f}")


# --------------------------------------------------------------------------- 3


def max_rss_mb() -> float:
    """Peak resident set of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a subprocess: sample ``--child-images`` images, print peak RSS as JSON."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.create("cosine", args.timesteps)
    model = TinyDenoiser(args.channels, args.mem_hidden).eval()
    per_sample = (args.channels, args.mem_size, args.mem_size)
    options = dict(sampler="ddim", steps=args.mem_steps, eta=1.0)  # η = 1: per-step noise too
    for _ in sample_in_batches(model, schedule, args.mem_batch, per_sample, args.mem_batch, seed=1, **options):
        pass  # warm-up: one batch, so the baseline includes one batch's working set
    baseline = max_rss_mb()
    kept, total = [], torch.zeros(per_sample)
    for batch in sample_in_batches(model, schedule, args.child_images, per_sample, args.mem_batch, seed=0, **options):
        total += batch.sum(0)  # consume the batch, as a writer of PNG files would
        if args.child_keep:
            kept.append(batch)
    print(json.dumps({"baseline_mb": baseline, "peak_mb": max_rss_mb()}))


def run_child(args: argparse.Namespace, images: int, keep: bool) -> dict[str, float]:
    command = [
        sys.executable, __file__, "--child-images", str(images), "--threads", str(args.threads),
        "--timesteps", str(args.timesteps), "--channels", str(args.channels), "--mem-hidden", str(args.mem_hidden),
        "--mem-size", str(args.mem_size), "--mem-batch", str(args.mem_batch), "--mem-steps", str(args.mem_steps),
    ]  # fmt: skip
    if keep:
        command.append("--child-keep")
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_memory(args: argparse.Namespace) -> None:
    few, many = args.mem_images
    image_mb = args.channels * args.mem_size**2 * 4 / 2**20
    print()
    print(
        f"peak memory, sample_in_batches (DDIM-{args.mem_steps}, η=1, batch {args.mem_batch}, "
        f"latents {args.channels}x{args.mem_size}x{args.mem_size} = {image_mb * 1024:.0f} KiB each):"
    )
    print(f"  {'images':>6} {'kept':<5} {'baseline MiB':>12} {'peak MiB':>9} {'growth MiB':>11}")
    peaks = {}
    for images, keep in ((few, False), (many, False), (many, True)):
        result = run_child(args, images, keep)
        peaks[(images, keep)] = result["peak_mb"]
        growth = result["peak_mb"] - result["baseline_mb"]
        kept = "yes" if keep else "no"
        print(f"  {images:>6} {kept:<5} {result['baseline_mb']:>12.1f} {result['peak_mb']:>9.1f} {growth:>11.1f}")
    print(f"  peak ratio {many} / {few} images:            {peaks[(many, False)] / peaks[(few, False)]:.3f}")
    print(
        f"  control, keeping every batch: ratio {peaks[(many, True)] / peaks[(few, False)]:.3f} "
        f"(the {many} latents alone are {many * image_mb:.1f} MiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings)")
    parser.add_argument("--timesteps", type=int, default=1000, help="T of the cosine schedule")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--size", type=int, default=8, help="latent side for the speed runs")
    parser.add_argument("--hidden", type=int, default=64, help="channels between the two convolutions")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sampler; the fastest is kept")
    parser.add_argument("--mem-images", type=int, nargs=2, default=[100, 1000], metavar=("FEW", "MANY"))
    parser.add_argument("--mem-size", type=int, default=64, help="latent side for the memory runs")
    parser.add_argument("--mem-hidden", type=int, default=16, help="hidden channels of the memory runs' model")
    parser.add_argument("--mem-batch", type=int, default=50)
    parser.add_argument("--mem-steps", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child-images", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child_images is not None:
        memory_child(args)
        return
    start = time.perf_counter()
    run_speed(args)
    if not args.skip_memory:
        run_memory(args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
