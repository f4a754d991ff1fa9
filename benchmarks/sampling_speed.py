"""Sampling speed at equal quality: seconds per image, FD and the sampler overhead, in one run.

    python benchmarks/sampling_speed.py --checkpoint runs/denoiser/denoiser.safetensors

For a trained denoiser (builtin:faces), DDIM-50 and DPM-Solver++(2M)-20 each sample 500
images in batches of 250 (as `ldm sample --batch-size 250` does), with the model calls
in float32 and in bfloat16 (a bf16 copy of the network, as `ldm sample` runs it). For
each it prints:

    s / image   wall seconds of the reverse chains per image (after a warm-up)
    FD, legib.  the scores `ldm evaluate` gives them (face-attribute features)
    overhead    the time of one batch's reverse chain over the time of the same number of
                model calls alone on a batch of that size, each the fastest of 3 runs taken in
                alternation: 1.00 means the sampler loop costs nothing beyond the model

With `--compile`, each precision also runs compiled (`ldm sample --compile`), and the
one-time compilation is printed beside: the images it takes to pay for itself are the
compilation seconds over the seconds per image it saves.

Equal quality means an FD within the run-to-run spread of the float32 one. No
assertions: it prints what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ldm_cli.commands.evaluate_faces import faces_config
from ldm_cli.commands.study_measure import Setting, decoded_uint8, timed_latents, warm_up
from ldm_cli.common.device import model_in_precision
from ldm_cli.diffusion.sampling import predict_v, sample
from ldm_cli.evaluation.face_quality import load_face_network, load_or_build_reference, score_faces
from ldm_cli.modelfiles.bundles import DenoiserBundle, load_denoiser

NUM_IMAGES = 500
BATCH = 250
SETTINGS = (Setting("ddim", 50), Setting("dpm++2m", 20))
Model = Callable[..., torch.Tensor]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prepared(bundle: DenoiserBundle, precision: str, compiled: bool) -> tuple[Model, float]:
    """The network as `ldm sample` runs it, and the seconds its first call took (compilation)."""
    model = model_in_precision(bundle.unet, precision, compile=compiled)
    with torch.inference_mode():  # as `sample` calls it: inference tensors, or torch.compile compiles again
        z = torch.randn(BATCH, *bundle.latent_shape)
        first = timed(lambda: predict_v(model, z, 999, None))
    return model, first


def overhead_ratio(model: Model, precision: str, bundle: DenoiserBundle, setting: Setting, repeats: int = 3) -> float:
    """min time of a batch's reverse chain / min time of its model calls alone, in alternation."""
    z = torch.randn(BATCH, *bundle.latent_shape)

    def chain() -> None:
        sample(model, bundle.schedule, (BATCH, *bundle.latent_shape), sampler=setting.sampler,
               steps=setting.steps, generator=torch.Generator().manual_seed(0), precision=precision)

    def calls() -> None:
        with torch.inference_mode():
            for _ in range(setting.steps):
                predict_v(model, z, 500, z)  # as `sample` calls it (a self-conditioned model also takes a z0)

    chains, models = [], []
    for _ in range(repeats):
        chains.append(timed(chain))
        models.append(timed(calls))
    return min(chains) / min(models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also run each precision compiled")
    args = parser.parse_args()
    bundle = load_denoiser(args.checkpoint)
    device = torch.device("cpu")
    bundle.to(device)
    network = load_face_network()
    reference, _, _ = load_or_build_reference(faces_config(bundle.vae.resolution, bundle), network)
    warm_up(bundle, device)
    print(f"{args.checkpoint}: {sum(p.numel() for p in bundle.unet.parameters()) / 1e6:.2f} M parameters, "
          f"{torch.get_num_threads()} threads, {NUM_IMAGES} images in batches of {BATCH}")
    print(f"{'setting':<14}{'precision':>10}{'compiled':>10}{'s / image':>11}{'FD':>8}{'legib.':>8}{'overhead':>10}"
          f"{'first call s':>14}")
    variants = [(precision, compiled) for compiled in ([False, True] if args.compile else [False])
                for precision in args.precisions]
    models = {variant: prepared(bundle, *variant) for variant in variants}  # compile each once
    for setting in SETTINGS:
        for (precision, compiled), (model, first_call) in models.items():
            latents, seconds = timed_latents(bundle, setting, NUM_IMAGES, 0, device, batch_size=BATCH,
                                             precision=precision, model=model)
            scores = score_faces(decoded_uint8(bundle, latents), reference, network, progress=False)
            overhead = overhead_ratio(model, precision, bundle, setting)
            print(f"{setting.label:<14}{precision:>10}{'yes' if compiled else 'no':>10}{seconds / NUM_IMAGES:>11.4f}"
                  f"{scores.fd:>8.2f}{scores.legibility:>8.3f}{overhead:>10.3f}{first_call:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
