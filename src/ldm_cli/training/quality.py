"""Sample quality while the denoiser trains (`[quality]` in its config).

Every `quality.every` updates (and at the last one) the EMA model draws `quality.samples`
DDIM samples from the same noise each time — so the curve shows the model changing, not
the draw — and they are scored as `ldm evaluate` scores them: Fréchet distance (FD) and
legibility in the packaged face-attribute network's features, against the training
faces (docs/MATH.md, §7). The numbers go into metrics.csv and metrics.png beside the
loss, with the seconds each measurement took. Only `builtin:faces` data has the network
that reads it; on other data the measurement is turned off with a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from ldm_cli.common.device import resolve_precision
from ldm_cli.config import DenoiserRunConfig
from ldm_cli.data.sources import resolve_source
from ldm_cli.diffusion.sampling import sample
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.evaluation.face_quality import load_face_network, load_or_build_reference, score_faces
from ldm_cli.modelfiles.bundles import VAEBundle

logger = logging.getLogger("ldm")

QUALITY_SEED = 20_251_129  # the one noise draw every measurement starts from
COLUMNS = ["fd", "legibility", "quality_seconds"]

Measure = Callable[[nn.Module, int], dict[str, float]]


def quality_measure(
    config: DenoiserRunConfig, schedule: NoiseSchedule, latents: VAEBundle, device: torch.device,
) -> Measure | None:
    """The measurement the loop calls now and then, or None when it is off."""
    quality = config.quality
    if quality.every == 0:
        return None
    if resolve_source(config.data).kind != "builtin":
        logger.warning(f"quality.every: sample quality is measured on builtin:faces only, not {config.data.source!r};"
                       " turned off (use `ldm evaluate` with your own feature network)")
        return None
    with torch.random.fork_rng(devices=[]):  # building the network draws numbers: keep the run's streams
        network = load_face_network(device=device)
        reference, _path, _cached = load_or_build_reference(config.data, network)
    steps = min(quality.steps, schedule.timesteps)
    precision = resolve_precision("auto", device)  # as `ldm sample` runs the model

    def measure(model: nn.Module, step: int) -> dict[str, float]:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        z = sample(model, schedule, (quality.samples, *latents.latent_shape), sampler="ddim", steps=steps,
                   generator=torch.Generator().manual_seed(QUALITY_SEED), device=device, precision=precision)
        model.train(was_training)
        scores = score_faces(latents.decode(z).cpu(), reference, network, what="quality samples", progress=False)
        return {"fd": scores.fd, "legibility": scores.legibility, "quality_seconds": time.perf_counter() - started}

    return measure
