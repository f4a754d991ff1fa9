"""How good generated `builtin:faces` images are, read by the packaged face-attribute network.

`ldm evaluate --reference builtin:faces` uses this, and so can training-time evaluation:
everything here works on tensors in memory. The network (`face_attributes.py`) gives
each image 192-d penultimate features and, per attribute head h, class probabilities
p_h(c | x) = softmax(logits_h)_c. From them, for a set S of N images against a
reference set R (builtin:faces' training faces):

    FD            ‖μ_S − μ_R‖² + Tr(Σ_S + Σ_R − 2(Σ_SΣ_R)^{1/2}) of the features
                  (`distances.frechet_distance`, docs/MATH.md §7): FID in these features.
    KID, P/R      `distances.kernel_distance` and `distances.precision_recall`, §7.
    legibility    (1/N) Σ_i 1[ min_h max_c p_h(c | x_i) ≥ τ ],  τ = 0.9:
                  the share of images on which every head is confident.
    attribute KL  per head, the predicted classes ĉ_i = argmax_c p_h(c | x_i) are counted,
                  n_c, and smoothed additively (α = 0.5, so no bin is empty):
                      p̂_c = (n_c + α) / (N + α·C_h),
                  then KL_h = Σ_c p̂^S_c · ln(p̂^S_c / p̂^R_c) in nats (samples ‖ reference);
                  reported as the mean over the heads, and per head.

Lower FD, KID and KL are better; higher legibility, precision and recall are better.

Three reference sets put a number in context (`heldout_faces`, `reconstruction_batches`,
`prior_batches`): held-out real faces (the floor a perfect generator would reach), VAE
reconstructions of them (the best the latent route can reach), and decoded prior
samples z ~ N(0, I) in the denoiser's normalised latent space (what the denoiser starts
from, and must beat). The reference's features, statistics and class counts are cached
as safetensors beside the image cache (`load_or_build_reference`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ldm_cli.common.files import file_sha256
from ldm_cli.common.progress import ProgressReporter
from ldm_cli.config import DataConfig
from ldm_cli.data import faces
from ldm_cli.data.pixels import to_float, to_uint8
from ldm_cli.data.prepare import load_images
from ldm_cli.data.sources import resolve_source
from ldm_cli.errors import UsageError
from ldm_cli.evaluation.distances import distances_to_reference, gaussian_stats, reference_radii, subset_rows
from ldm_cli.evaluation.face_attributes import FaceAttributeNet, default_weights_path, load_face_attribute_net
from ldm_cli.evaluation.reference_cache import cache_path, consistent_stats, read_cached, write_cached
from ldm_cli.modelfiles.bundles import VAEBundle

logger = logging.getLogger("ldm")

NETWORK_NAME = "face-attributes"
LEGIBLE_P = 0.9  # τ: a head is confident when its largest class probability reaches this
KL_SMOOTHING = 0.5  # α: added to every class count before the KL
PRIOR_SEED = 0  # z ~ N(0, I) of the prior decodes come from this seed
REFERENCE_FORMAT = 1  # bump whenever what the cached reference holds changes
BATCH_SIZE = 256
PROGRESS_EVERY = 500  # images between log lines off a terminal (at least)


# --------------------------------------------------------------------------- the network


@dataclass
class FaceNetwork:
    """The face-attribute network on a device, and what identifies it.

    `identity` changes whenever the features could: the weights' SHA-256, the faces
    generator version and the network's input size. It keys the cached reference.
    """

    net: FaceAttributeNet
    path: Path
    sha256: str
    device: torch.device

    @property
    def identity(self) -> str:
        return f"{NETWORK_NAME}:{self.sha256}:faces-v{faces.VERSION}:{self.net.resolution}px"

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.net.heads)

    def describe(self) -> dict[str, object]:
        """The network's identity for reports and JSON."""
        return {"name": NETWORK_NAME, "identity": self.identity, "file": str(self.path), "sha256": self.sha256,
                "faces_version": faces.VERSION, "resolution": self.net.resolution,
                "feature_dim": self.net.feature_dim, "heads": list(self.heads)}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features `(B, D)` and per-head probabilities `(B, C_h)`, float32 on the CPU, of one batch."""
        features = self.net.features(as_net_input(images).to(self.device))
        logits = self.net.classify(features)
        return features.float().cpu(), {name: out.float().softmax(1).cpu() for name, out in logits.items()}


def load_face_network(path: Path | None = None, device: torch.device | str = "cpu") -> FaceNetwork:
    """The face-attribute network of `path` (default: the one shipped with the package)."""
    path = Path(path) if path is not None else default_weights_path()
    net = load_face_attribute_net(path).to(device)
    return FaceNetwork(net, path, file_sha256(path), torch.device(device))


def as_net_input(images: torch.Tensor) -> torch.Tensor:
    """Images as the network takes them: uint8 [0, 255] → float [-1, 1]; float is taken as [-1, 1]."""
    return to_float(images) if images.dtype == torch.uint8 else images.float()


# --------------------------------------------------------------------------- reading a set of images


@dataclass(frozen=True)
class FaceReadout:
    """What the network reads from a set of N images."""

    features: torch.Tensor  # (N, D) float32
    probabilities: dict[str, torch.Tensor]  # head → (N, C_h) float32

    def __len__(self) -> int:
        return len(self.features)


def read_batches(network: FaceNetwork, batches: Iterable[torch.Tensor], total: int, what: str,
                 progress: bool = True) -> FaceReadout:
    """The readout of image batches (uint8, or float in [-1, 1]), with progress over `total` images."""
    features: list[torch.Tensor] = []
    probabilities: dict[str, list[torch.Tensor]] = {name: [] for name in network.heads}
    with ProgressReporter(f"face features of {what}", total=total, every=max(PROGRESS_EVERY, total // 10),
                          enabled=None if progress else False) as reporter:
        for images in batches:
            batch_features, batch_probabilities = network.read(images)
            features.append(batch_features)
            for name, p in batch_probabilities.items():
                probabilities[name].append(p)
            reporter.advance(by=len(images))
    if not features:
        raise ValueError(f"{what}: no images to read")
    return FaceReadout(torch.cat(features), {name: torch.cat(p) for name, p in probabilities.items()})


def image_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of `batch_size` images (copies, so a memory map is read once each)."""
    for start in range(0, len(images), batch_size):
        yield torch.as_tensor(images[start:start + batch_size]).clone()


def read_images(network: FaceNetwork, images: torch.Tensor, batch_size: int = BATCH_SIZE,
                what: str = "images", progress: bool = True) -> FaceReadout:
    """The readout of `(N, 3, H, W)` images (uint8, or float in [-1, 1]), in batches."""
    return read_batches(network, image_batches(images, batch_size), len(images), what, progress)


# --------------------------------------------------------------------------- legibility and attribute KL


def legibility(probabilities: Mapping[str, torch.Tensor], threshold: float = LEGIBLE_P) -> float:
    """(1/N) Σ_i 1[min_h max_c p_h(c | x_i) ≥ τ]: the share of images every head is sure of."""
    confidence = torch.stack([p.max(dim=1).values for p in probabilities.values()]).min(dim=0).values
    return float((confidence >= threshold).double().mean())


def class_counts(probabilities: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per head, how many images have each class as their most probable one: int64 `(C_h,)`."""
    return {name: torch.bincount(p.argmax(dim=1), minlength=p.shape[1]) for name, p in probabilities.items()}


def smoothed_histogram(counts: torch.Tensor, alpha: float = KL_SMOOTHING) -> torch.Tensor:
    """p̂_c = (n_c + α) / (N + α·C), in float64: no class has probability 0."""
    smoothed = counts.double() + alpha
    return smoothed / smoothed.sum()


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p ‖ q) = Σ_c p_c ln(p_c / q_c), in nats, for strictly positive histograms."""
    return float((p * (p / q).log()).sum())


def attribute_kl(
    sample_counts: Mapping[str, torch.Tensor], reference_counts: Mapping[str, torch.Tensor],
    alpha: float = KL_SMOOTHING,
) -> dict[str, float]:
    """Per head, KL(p̂_samples ‖ p̂_reference) of the smoothed class histograms."""
    return {name: kl_divergence(smoothed_histogram(counts, alpha), smoothed_histogram(reference_counts[name], alpha))
            for name, counts in sample_counts.items()}


# --------------------------------------------------------------------------- the reference and the scores


@dataclass(frozen=True)
class ReferenceFaces:
    """What the reference set contributes to every score, computed once."""

    features: torch.Tensor  # (N, D) float32, for KID
    mu: torch.Tensor  # (D,) float64
    sigma: torch.Tensor  # (D, D) float64
    radii: torch.Tensor  # k-NN radii of pr_subset(features); empty when N ≤ k
    counts: dict[str, torch.Tensor]  # head → (C_h,) int64 counts of predicted classes

    def __len__(self) -> int:
        return len(self.features)


def reference_from(readout: FaceReadout) -> ReferenceFaces:
    """Reduce the readout of the reference images to what scoring needs (at least 2 images)."""
    mu, sigma = gaussian_stats(readout.features)
    return ReferenceFaces(readout.features, mu, sigma, reference_radii(readout.features),
                          class_counts(readout.probabilities))


@dataclass(frozen=True)
class FaceScores:
    """Every number for one set of images against the reference. Precision and recall
    are None when a side has at most k = 3 images."""

    count: int
    fd: float
    kid_mean: float
    kid_std: float
    precision: float | None
    recall: float | None
    legibility: float
    attribute_kl: float  # mean over the heads
    attribute_kl_per_head: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def score_readout(readout: FaceReadout, reference: ReferenceFaces, device: torch.device | str = "cpu") -> FaceScores:
    """All scores of a readout (at least 2 images) against the reference."""
    d = distances_to_reference(readout.features.to(device), reference.features, reference.mu, reference.sigma,
                               reference.radii)
    per_head = attribute_kl(class_counts(readout.probabilities), reference.counts)
    return FaceScores(
        count=len(readout), fd=d.fd, kid_mean=d.kid_mean, kid_std=d.kid_std, precision=d.precision, recall=d.recall,
        legibility=legibility(readout.probabilities), attribute_kl=sum(per_head.values()) / len(per_head),
        attribute_kl_per_head=per_head,
    )


def score_faces(
    images: torch.Tensor | Iterable[torch.Tensor], reference: ReferenceFaces, network: FaceNetwork, *,
    total: int | None = None, batch_size: int = BATCH_SIZE, what: str = "samples", progress: bool = True,
) -> FaceScores:
    """Score generated images against the reference: a `(N, 3, H, W)` tensor (uint8, or float
    in [-1, 1]), or an iterable of such batches of `total` images in all."""
    if isinstance(images, torch.Tensor):
        readout = read_images(network, images, batch_size, what, progress)
    else:
        if total is None:
            raise ValueError("score_faces: pass `total` with an iterable of batches")
        readout = read_batches(network, images, total, what, progress)
    return score_readout(readout, reference, network.device)


# --------------------------------------------------------------------------- the cached reference


def check_faces_config(cfg: DataConfig) -> None:
    """The reference here is builtin:faces' training split: it must have one to score against."""
    if resolve_source(cfg).kind != "builtin":
        raise UsageError(f"face-attribute scores need builtin:faces as the reference, not {cfg.source!r}")


def reference_path(cfg: DataConfig, network: FaceNetwork, limit: int | None) -> Path:
    """The cache file of the training faces of `cfg`, read by `network`, at most `limit` of them."""
    return cache_path(cfg, "facestats", {"format": REFERENCE_FORMAT, "network": network.identity, "limit": limit,
                                         "split": [cfg.builtin_size, cfg.holdout_fraction, cfg.seed]})


def read_reference(path: Path, network: FaceNetwork) -> ReferenceFaces | None:
    """The cached reference if `path` holds a complete file made by this network; else None."""
    tensors = read_cached(path, REFERENCE_FORMAT, network.identity, "face reference")
    if tensors is None or not consistent_stats(tensors):
        return None
    n = len(tensors["features"])
    counts = {h.name: tensors.get(f"counts.{h.name}") for h in network.net.heads}
    if any(c is None or c.shape != (len(h.classes),) or int(c.sum()) != n
           for h, c in zip(network.net.heads, counts.values())):
        return None
    return ReferenceFaces(tensors["features"], tensors["mu"], tensors["sigma"], tensors["radii"], counts)


def write_reference(path: Path, reference: ReferenceFaces, network: FaceNetwork, cfg: DataConfig) -> None:
    """The reference as safetensors with its identity in the metadata (no pickle), atomically."""
    tensors = {"features": reference.features, "mu": reference.mu, "sigma": reference.sigma,
               "radii": reference.radii, **{f"counts.{name}": c for name, c in reference.counts.items()}}
    write_cached(path, tensors, REFERENCE_FORMAT, network.identity, source=cfg.source,
                 resolution=str(cfg.resolution), count=str(len(reference)),
                 split=json.dumps([cfg.builtin_size, cfg.holdout_fraction, cfg.seed]))


def training_faces(cfg: DataConfig, limit: int | None) -> torch.Tensor:
    """uint8 training faces of `cfg`: all of them, or a fixed random subset of `limit`."""
    train = load_images(cfg).train
    rows = subset_rows(len(train), limit or len(train))
    return train if len(rows) == len(train) else train[torch.from_numpy(rows)]


def load_or_build_reference(
    cfg: DataConfig, network: FaceNetwork, limit: int | None = None, batch_size: int = BATCH_SIZE
) -> tuple[ReferenceFaces, Path, bool]:
    """The reference of `cfg`'s training faces: (reference, cache file, whether it was cached)."""
    check_faces_config(cfg)
    path = reference_path(cfg, network, limit)
    cached = read_reference(path, network)
    if cached is not None:
        logger.info("face reference from %s", path)
        return cached, path, True
    images = training_faces(cfg, limit)
    if len(images) < 2:
        raise UsageError(f"builtin:faces: {len(images)} training face(s); at least 2 are needed")
    reference = reference_from(read_images(network, images, batch_size, "reference faces"))
    write_reference(path, reference, network, cfg)
    return reference, path, False


# --------------------------------------------------------------------------- the three reference sets


def heldout_faces(cfg: DataConfig, count: int) -> torch.Tensor:
    """The first `count` held-out faces of `cfg` (uint8): never trained on, so the floor."""
    return torch.as_tensor(load_images(cfg).holdout[:count]).clone()


def reconstruction_batches(vae: VAEBundle, images: torch.Tensor, batch_size: int = BATCH_SIZE) -> Iterator[torch.Tensor]:
    """uint8 reconstructions D(E(x)) of uint8 images, via the posterior mean, in batches.

    Quantised to uint8 as saved samples are, so they are measured the same way."""
    for batch in image_batches(images, batch_size):
        z = vae.encode(to_float(batch).to(vae.device))
        yield to_uint8(vae.decode(z).cpu())


def prior_batches(vae: VAEBundle, count: int, batch_size: int = BATCH_SIZE, seed: int = PRIOR_SEED) -> Iterator[torch.Tensor]:
    """uint8 decodes of z ~ N(0, I) in `vae`'s normalised latent space (a denoiser's starting point)."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, count, batch_size):
        z = torch.randn((min(batch_size, count - start), *vae.latent_shape), generator=generator)
        yield to_uint8(vae.decode(z.to(vae.device)).cpu())
