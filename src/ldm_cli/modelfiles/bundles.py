"""The two exported files, `vae.safetensors` and `denoiser.safetensors`, and loading them.

vae.safetensors        tensors  vae.*, latent_stats.{mean,std}
                       metadata model (VAEModelConfig), data (source, resolution), latent_shape
denoiser.safetensors   tensors  denoiser.* (EMA weights), latent_stats.{mean,std},
                                vae.*, vae_latent_stats.{mean,std}   (the bundled VAE)
                       metadata model (UNetConfig), schedule, vae_model, vae_data, latent_shape

A denoiser file alone is enough to sample: it carries the schedule, the latent
statistics it was trained with and the VAE that decodes its latents.

Loading reads every metadata field through `read_field` with a parser that checks its
type, shape and agreement with the rest of the file, and every group of tensors through
`read_tensors` against the network the config builds: a damaged file is refused with one
line naming the field or tensor, never loaded in part.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, TypeAdapter
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from ldm_cli.config import DataConfig, UNetConfig, VAEModelConfig
from ldm_cli.diffusion.schedules import NoiseSchedule
from ldm_cli.errors import CheckpointError
from ldm_cli.modelfiles.format import FieldProblem, LoadedModel, load_model, read_field, read_tensors, save_model
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
        """Move to `device`, the U-Net in channels-last memory: its ConvNeXt blocks permute to
        channels-last around every LayerNorm and MLP, which is then free
        (`benchmarks/cpu_speed.py`: DDIM sampling 1.25× faster on a 2-core CPU)."""
        self.unet.to(device, memory_format=torch.channels_last)
        self.vae.to(device)
        return self


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


# --------------------------------------------------------------------------- reading a file

LatentShape = tuple[int, int, int]


class _ScheduleFields(TypedDict):
    """The `schedule` metadata field, as `NoiseSchedule.to_metadata` writes it."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    kind: str
    timesteps: int
    beta_start: float
    beta_end: float


_SCHEDULE_FIELDS = TypeAdapter(_ScheduleFields)


def _schedule(value: Any) -> NoiseSchedule:
    """The schedule; `NoiseSchedule.create` refuses values out of range (a `UsageError`)."""
    fields = _SCHEDULE_FIELDS.validate_python(value)
    return NoiseSchedule.create(fields["kind"], fields["timesteps"], fields["beta_start"], fields["beta_end"])


def _data_for(vae: VAE, value: Any) -> DataConfig:
    """The data config, whose resolution the VAE must be able to encode."""
    data = DataConfig.model_validate(value)
    vae.latent_shape(data.resolution)  # ValueError unless a multiple of the downsample factor
    return data


def _unet_config_for(latent_shape: LatentShape, value: Any) -> UNetConfig:
    """The U-Net config, whose latents must be those the bundled VAE makes."""
    cfg = UNetConfig.model_validate(value)
    own = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    if own != latent_shape:
        raise FieldProblem(f"describes latents {own}, but its VAE makes {latent_shape}")
    return cfg


def _latent_shape_equal_to(expected: LatentShape, value: Any) -> None:
    """The `latent_shape` field records what the VAE makes; anything else is damage."""
    if value != list(expected):
        raise FieldProblem(f"is {reprlib.repr(value)}, but the VAE's config gives {expected}")


def _load_weights(module: torch.nn.Module, loaded: LoadedModel, prefix: str, what: str) -> None:
    """Load the tensors under `prefix.` into `module`, refusing any that do not fit it."""
    module.load_state_dict(read_tensors(loaded, prefix, module.state_dict(), f"{what} weights"))


def _latent_stats(loaded: LoadedModel, prefix: str, channels: int) -> LatentStats:
    """`prefix.mean` and `prefix.std`, one value per latent channel, std > 0."""
    expected = {"mean": torch.empty(channels), "std": torch.empty(channels)}
    stats = read_tensors(loaded, prefix, expected, "latent statistics")
    if not bool((stats["std"] > 0).all()):
        raise CheckpointError(
            f"checkpoint '{loaded.path}': tensor '{prefix}.std' holds values <= 0; "
            "a standard deviation must be positive"
        )
    return LatentStats(mean=stats["mean"].float(), std=stats["std"].float())


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
    vae = VAE(read_field(loaded, model_key, VAEModelConfig.model_validate))
    data = read_field(loaded, data_key, partial(_data_for, vae))
    _load_weights(vae, loaded, weights, "VAE")
    return VAEBundle(
        network=vae.eval().requires_grad_(False),
        stats=_latent_stats(loaded, stats_prefix, vae.cfg.latent_channels),
        data=data,
    )


def load_vae(path: str | Path) -> VAEBundle:
    """Rebuild a VAE from vae.safetensors (a denoiser file is refused: wrong kind)."""
    loaded = load_model(path, "vae")
    bundle = _vae_from(loaded, "model", "data", "vae", "latent_stats")
    read_field(loaded, "latent_shape", partial(_latent_shape_equal_to, bundle.latent_shape))
    return bundle


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
    vae = _vae_from(loaded, "vae_model", "vae_data", "vae", "vae_latent_stats")
    read_field(loaded, "latent_shape", partial(_latent_shape_equal_to, vae.latent_shape))
    unet = UNet(read_field(loaded, "model", partial(_unet_config_for, vae.latent_shape)))
    _load_weights(unet, loaded, "denoiser", "denoiser")
    return DenoiserBundle(
        unet=unet.eval().requires_grad_(False),
        schedule=read_field(loaded, "schedule", _schedule),
        vae=vae.with_stats(_latent_stats(loaded, "latent_stats", vae.latent_shape[0])),
        metadata=loaded.metadata,
    )
