"""The two exported files, `vae.safetensors` and `denoiser.safetensors`, and loading them.

vae.safetensors        tensors  vae.*, latent_stats.{mean,std}
                       metadata model (VAEModelConfig), data (source, resolution), latent_shape
denoiser.safetensors   tensors  denoiser.* (EMA weights), latent_stats.{mean,std},
                                vae.*, vae_latent_stats.{mean,std}   (the bundled VAE)
                       metadata model (UNetConfig), schedule, vae_model, vae_data, latent_shape

A denoiser file alone is enough to sample: it carries the schedule, the latent
statistics it was trained with and the VAE that decodes its latents.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ldm_cli.config import DataConfig, UNetConfig, VAEModelConfig
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.errors import CheckpointError
from ldm_cli.modelfiles.format import LoadedModel, load_model, save_model
from ldm_cli.models.latent_stats import LatentStats
from ldm_cli.models.unet import UNet
from ldm_cli.models.vae import VAE


@dataclass
class VAEBundle:
    """A VAE with the statistics that normalise its latents: images ⇄ normalised latents.

    `encode` and `decode` are the only way in and out of the latent space the denoiser
    sees (in the spirit of CompVis' ``encode_first_stage`` / ``decode_first_stage``):
    ``z_n = (E(x) − mean)/std`` and ``x = D(z_n·std + mean)`` (docs/MATH.md, §6).
    """

    network: VAE
    stats: LatentStats  # of posterior samples of the training set the latents come from
    data: DataConfig  # what the VAE was trained on (its held-out split is reproducible)

    @property
    def resolution(self) -> int:
        return self.data.resolution

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.network.latent_shape(self.resolution)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device: torch.device | str) -> "VAEBundle":
        self.network.to(device)
        return self

    def with_stats(self, stats: LatentStats) -> "VAEBundle":
        """The same network, normalising with other statistics (a denoiser's own)."""
        return replace(self, stats=stats)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
        """Normalised latents of images x in [-1, 1]: the posterior mean μ, or a sample μ + σ·ε."""
        posterior = self.network.encode(x)
        return self.stats.normalize(posterior.sample() if sample else posterior.mean)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from normalised latents: x = D(z·std + mean), clamped."""
        return self.network.decode(self.stats.denormalize(z)).clamp(-1, 1)


@dataclass
class DenoiserBundle:
    """Everything sampling needs, from one denoiser file."""

    unet: UNet
    schedule: NoiseSchedule
    vae: VAEBundle  # normalising with the statistics the denoiser was trained with
    metadata: dict[str, Any]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.vae.latent_shape

    def to(self, device: torch.device | str) -> "DenoiserBundle":
        self.unet.to(device)
        self.vae.to(device)
        return self


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _model_config(cls, data: Any, path: Path, key: str):
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise CheckpointError(f"checkpoint '{path}': invalid {key} in metadata ({err.errors()[0]['msg']})") from None


def _load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"checkpoint '{path}': {what} weights do not match its config ({first})") from None


def _require(loaded: LoadedModel, keys: list[str]) -> None:
    missing = [k for k in keys if k not in loaded.metadata]
    if missing:
        raise CheckpointError(f"checkpoint '{loaded.path}': metadata lacks {', '.join(missing)}")


# --------------------------------------------------------------------------- VAE


def export_vae(path: Path, vae: VAE, stats: LatentStats, data: DataConfig, extra: dict[str, Any] | None = None) -> Path:
    """Write vae.safetensors: weights, latent statistics and the config to rebuild it."""
    tensors = {**_prefixed("vae", vae.state_dict()), **stats.tensors("latent_stats")}
    metadata = {
        "model": vae.cfg.model_dump(mode="json"),
        "data": data.model_dump(mode="json", exclude={"cache_dir"}),
        "latent_shape": list(vae.latent_shape(data.resolution)),
        **(extra or {}),
    }
    return save_model(path, "vae", tensors, metadata)


def _vae_from(loaded: LoadedModel, model_key: str, data_key: str, weights: str, stats_prefix: str) -> VAEBundle:
    _require(loaded, [model_key, data_key])
    cfg = _model_config(VAEModelConfig, loaded.metadata[model_key], loaded.path, model_key)
    vae = VAE(cfg)
    _load_weights(vae, loaded.part(weights), loaded.path, "VAE")
    return VAEBundle(
        network=vae.eval().requires_grad_(False),
        stats=LatentStats.from_tensors(loaded.tensors, stats_prefix),
        data=_model_config(DataConfig, loaded.metadata[data_key], loaded.path, data_key),
    )


def load_vae(path: str | Path) -> VAEBundle:
    """Rebuild a VAE from vae.safetensors (a denoiser file is refused: wrong kind)."""
    loaded = load_model(path, "vae")
    return _vae_from(loaded, "model", "data", "vae", "latent_stats")


# --------------------------------------------------------------------------- denoiser


def export_denoiser(
    path: Path, unet: UNet, schedule: NoiseSchedule, latents: VAEBundle, vae_stats: LatentStats,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write denoiser.safetensors with the VAE bundled in the same file.

    ``latents`` is the VAE normalising with the denoiser's statistics; ``vae_stats`` are
    the VAE's own (kept so the bundled VAE is complete).
    """
    tensors = {
        **_prefixed("denoiser", unet.state_dict()),
        **latents.stats.tensors("latent_stats"),
        **_prefixed("vae", latents.network.state_dict()),
        **vae_stats.tensors("vae_latent_stats"),
    }
    metadata = {
        "model": unet.cfg.model_dump(mode="json"),
        "schedule": schedule.to_metadata(),
        "vae_model": latents.network.cfg.model_dump(mode="json"),
        "vae_data": latents.data.model_dump(mode="json", exclude={"cache_dir"}),
        "latent_shape": list(latents.latent_shape),
        **(extra or {}),
    }
    return save_model(path, "denoiser", tensors, metadata)


def load_denoiser(path: str | Path) -> DenoiserBundle:
    """Rebuild the EMA denoiser, its schedule, its latent statistics and its VAE."""
    loaded = load_model(path, "denoiser")
    _require(loaded, ["model", "schedule"])
    cfg = _model_config(UNetConfig, loaded.metadata["model"], loaded.path, "model")
    unet = UNet(cfg)
    _load_weights(unet, loaded.part("denoiser"), loaded.path, "denoiser")
    try:
        schedule = NoiseSchedule.from_metadata(loaded.metadata["schedule"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{loaded.path}': invalid schedule in metadata ({err})") from None
    vae = _vae_from(loaded, "vae_model", "vae_data", "vae", "vae_latent_stats")
    return DenoiserBundle(
        unet=unet.eval().requires_grad_(False),
        schedule=schedule,
        vae=vae.with_stats(LatentStats.from_tensors(loaded.tensors, "latent_stats")),
        metadata=loaded.metadata,
    )
