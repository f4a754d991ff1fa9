"""The measurements of `ldm study`: sample sets scored by the face network (timed), and
reimaginings of one image by forward noise + DDPM, forward noise + DDIM, and DDIM
inversion + DDIM, with their diversity and their fidelity to the input."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ldm_cli.commands.reimagine import forward_noise_generator, start_timestep
from ldm_cli.data.pixels import to_uint8
from ldm_cli.diffusion.sampling import ddim_invert, forward_noise, sample, sample_in_batches
from ldm_cli.evaluation.face_quality import FaceNetwork, FaceScores, ReferenceFaces, read_images, score_faces
from ldm_cli.evaluation.image_metrics import psnr
from ldm_cli.modelfiles.bundles import DenoiserBundle

BATCH_SIZE = 128  # samples per sampling batch
REVERSE_SEED_OFFSET = 7919  # the reverse chains of the reimaginings use seeds seed·K + offset + k


# --------------------------------------------------------------------------- sample sets


@dataclass(frozen=True)
class Setting:
    """One way of sampling: a sampler, its step count (None: every timestep) and clip limit."""

    sampler: str
    steps: int | None
    clip_limit: float | None = None

    @property
    def label(self) -> str:
        name = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++2m": "DPM++"}[self.sampler]
        return f"{name}-{self.steps}" if self.steps is not None else name


@dataclass(frozen=True)
class SetResult:
    """A sample set's scores and the wall seconds per image of its reverse chain."""

    setting: Setting
    model_steps: int  # model evaluations per image
    seconds_per_image: float
    scores: FaceScores

    def to_dict(self) -> dict[str, object]:
        return {"label": self.setting.label, **asdict(self.setting), "model_steps": self.model_steps,
                "seconds_per_image": self.seconds_per_image, **self.scores.to_dict()}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(bundle: DenoiserBundle, device: torch.device) -> None:
    """One small batch through the model and the VAE, so the first timed set pays no start-up cost."""
    z = sample(bundle.unet, bundle.schedule, (min(8, BATCH_SIZE), *bundle.latent_shape), sampler="ddim", steps=2,
               generator=torch.Generator().manual_seed(0), device=device)
    bundle.vae.decode(z)
    synchronize(device)


def timed_latents(bundle: DenoiserBundle, setting: Setting, num: int, seed: int, device: torch.device,
                  batch_size: int = BATCH_SIZE, precision: str = "fp32",
                  model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, float]:
    """`num` clean latents of `setting` and the wall seconds their reverse chains took; `model`
    (default: the bundle's network) is what the sampler calls, e.g. one already prepared by
    `common.device.model_in_precision`."""
    batches, seconds = [], 0.0
    chains = sample_in_batches(model or bundle.unet, bundle.schedule, num, bundle.latent_shape, batch_size, seed,
                               sampler=setting.sampler, steps=setting.steps, clip_limit=setting.clip_limit,
                               device=device, precision=precision)
    while True:
        start = time.perf_counter()
        batch = next(chains, None)
        synchronize(device)
        seconds += time.perf_counter() - start
        if batch is None:
            return torch.cat(batches), seconds
        batches.append(batch)


def decoded_uint8(bundle: DenoiserBundle, latents: torch.Tensor) -> torch.Tensor:
    """uint8 images of latents, decoded in batches (quantised as saved samples are)."""
    return torch.cat([to_uint8(bundle.vae.decode(z).cpu()) for z in latents.split(BATCH_SIZE)])


def measure_set(bundle: DenoiserBundle, setting: Setting, num: int, seed: int, device: torch.device,
                reference: ReferenceFaces, network: FaceNetwork, precision: str = "fp32") -> SetResult:
    """Sample `num` images with `setting` (timed; model calls in `precision`), then score them (not timed)."""
    latents, seconds = timed_latents(bundle, setting, num, seed, device, precision=precision)
    scores = score_faces(decoded_uint8(bundle, latents), reference, network, what=setting.label, progress=False)
    model_steps = bundle.schedule.timesteps if setting.steps is None else setting.steps
    return SetResult(setting, model_steps, seconds / num, scores)


def pareto_front(results: Sequence[SetResult]) -> list[SetResult]:
    """The results no other result beats on both seconds per image and FD, fastest first."""
    front, best_fd = [], float("inf")
    for r in sorted(results, key=lambda r: (r.seconds_per_image, r.scores.fd)):
        if r.scores.fd < best_fd:
            front.append(r)
            best_fd = r.scores.fd
    return front


# --------------------------------------------------------------------------- reimagining one image


@dataclass(frozen=True)
class Reimagined:
    """One image reimagined at one strength: K DDPM and K DDIM results from the same forward-
    noised latent (K reverse seeds), and DDIM from the DDIM-inverted latent; images in [-1, 1]."""

    strength: float
    t: int
    ddim_steps: int
    ddpm: torch.Tensor  # (K, 3, H, W)
    ddim: torch.Tensor  # (K, 3, H, W)
    inverted: torch.Tensor  # (1, 3, H, W)


def reimagine_ddim_steps(strength: float, t: int, steps: int) -> int:
    """DDIM's steps from t, as `ldm reimagine` takes them: steps·strength, at least 1, at most t + 1."""
    return max(1, min(t + 1, round(steps * strength)))


def reverse_generators(seed: int, count: int) -> list[torch.Generator]:
    """One generator per reimagining, independent of the forward noise's stream."""
    return [torch.Generator().manual_seed(seed * count + REVERSE_SEED_OFFSET + k) for k in range(count)]


def reimagine(bundle: DenoiserBundle, z0: torch.Tensor, strength: float, steps: int, seed: int, count: int,
              device: torch.device) -> Reimagined:
    """Reimagine the latent z0 (1, …) at `strength` three ways (see `Reimagined`).

    DDIM runs each seed as its own batch, so its K results are the same computation
    repeated: any difference between them would be randomness, not batching."""
    t = start_timestep(strength, bundle.schedule.timesteps)
    n = reimagine_ddim_steps(strength, t, steps)
    z_t = forward_noise(bundle.schedule, z0, t, forward_noise_generator(seed))
    common = {"t_start": t, "device": device}
    ddpm = sample(bundle.unet, bundle.schedule, (count, *z0.shape[1:]), sampler="ddpm",
                  generator=reverse_generators(seed, count), z_start=z_t.repeat(count, 1, 1, 1), **common)
    ddim = torch.cat([sample(bundle.unet, bundle.schedule, z_t.shape, sampler="ddim", steps=n, generator=g,
                             z_start=z_t, **common) for g in reverse_generators(seed, count)])
    z_inv = ddim_invert(bundle.unet, bundle.schedule, z0, n, t_start=t)
    inverted = sample(bundle.unet, bundle.schedule, z_inv.shape, sampler="ddim", steps=n, z_start=z_inv, **common)
    decode = bundle.vae.decode
    return Reimagined(strength, t, n, decode(ddpm).cpu(), decode(ddim).cpu(), decode(inverted).cpu())


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of rows of (K, D) features."""
    return float(torch.pdist(features.double()).mean()) if len(features) > 1 else 0.0


def features_of(network: FaceNetwork, images: torch.Tensor) -> torch.Tensor:
    """The face network's (N, 192) features of images in [-1, 1]."""
    return read_images(network, images, progress=False).features


@dataclass(frozen=True)
class StrengthResult:
    """Diversity of the K reimaginings and fidelity to the input of each route, at one strength.

    Fidelity: PSNR (dB) of the result against the input image, and the face-feature
    distance to it; DDPM's are means over its K results."""

    strength: float
    t: int
    ddim_steps: int
    diversity_ddpm: float
    diversity_ddim: float
    psnr: dict[str, float]  # route → dB
    feature_distance: dict[str, float]  # route → distance

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


ROUTES = {"noise+ddpm": "forward noise + DDPM", "noise+ddim": "forward noise + DDIM",
          "inversion+ddim": "DDIM inversion + DDIM"}


def measure_strength(network: FaceNetwork, original: torch.Tensor, result: Reimagined) -> StrengthResult:
    """Diversity and fidelity of one strength's reimaginings of `original` (1, 3, H, W) in [-1, 1]."""
    target = features_of(network, original)
    outputs = {"noise+ddpm": result.ddpm, "noise+ddim": result.ddim, "inversion+ddim": result.inverted}
    features = {route: features_of(network, images) for route, images in outputs.items()}
    return StrengthResult(
        strength=result.strength, t=result.t, ddim_steps=result.ddim_steps,
        diversity_ddpm=mean_pairwise_distance(features["noise+ddpm"]),
        diversity_ddim=mean_pairwise_distance(features["noise+ddim"]),
        psnr={route: float(psnr(images, original.expand_as(images)).mean()) for route, images in outputs.items()},
        feature_distance={route: float((f - target).norm(dim=1).mean()) for route, f in features.items()},
    )
