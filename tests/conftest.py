"""Shared test set-up: a private image cache and small, fast configs."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


class PickleTrap:
    """Unpickling this creates the file `marker`: tests that refuse pickles check it never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Never touch the user's ~/.cache/ldm; share one cache across the session."""
    cache = tmp_path_factory.mktemp("ldm-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LDM_CACHE_DIR", str(cache))
    yield cache
    mp.undo()


@pytest.fixture
def decode_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls to `decoding.decode_image`; the count is `counter[0]`."""
    from ldm_cli.data import decoding

    counter = [0]
    real = decoding.decode_image

    def counting(blob: bytes, resolution: int):
        counter[0] += 1
        return real(blob, resolution)

    monkeypatch.setattr(decoding, "decode_image", counting)
    return counter


def tiny_vae_overrides(out, steps: int = 20) -> list[str]:
    """`--set` values for a VAE run of a few seconds: 16×16 faces, 2×8×8 latents."""
    return [
        "data.builtin_size=96", "data.resolution=16", "data.holdout_fraction=0.1",
        "model.base_channels=8", "model.channel_mults=[1,2]", "model.downsample_factor=2",
        "model.latent_channels=2", "train.batch_size=16", f"train.max_steps={steps}",
        "optim.warmup_steps=2", "optim.lr=3e-3", "loss.beta_decay_steps=10",
        "logging.checkpoint_every=10", "logging.preview_every=10", "logging.log_every=5",
        "train.ema_decay=0.9", f"output.dir='{out}'",
    ]


def tiny_denoiser_overrides(out, vae_path, steps: int = 20) -> list[str]:
    """`--set` values for a denoiser run of a few seconds on the tiny VAE's latents."""
    return [
        "data.builtin_size=96", "data.resolution=16", "data.holdout_fraction=0.1",
        "model.latent_channels=2", "model.latent_size=8", "model.base_channels=16",
        "model.channel_mults=[1,2]", "model.blocks_per_level=1", "model.attention_levels=[1]",
        "diffusion.timesteps=50", "train.batch_size=16", f"train.max_steps={steps}",
        "optim.warmup_steps=2", "optim.lr=2e-3", "logging.checkpoint_every=10",
        "logging.preview_every=10", "train.ema_decay=0.9", f"latents.vae='{vae_path}'", f"output.dir='{out}'",
    ]


def tiny_demo_overrides() -> tuple[list[str], list[str]]:
    """The tiny configs' values for `ldm demo`'s VAE and denoiser, without the keys the demo sets itself."""
    def kept(overrides: list[str]) -> list[str]:
        return [o for o in overrides if not o.startswith(("output.dir", "latents.vae", "train.max_steps"))]
    return kept(tiny_vae_overrides("x", 1)), kept(tiny_denoiser_overrides("x", "x", 1))


@pytest.fixture(scope="session")
def trained_vae(tmp_path_factory: pytest.TempPathFactory, _private_cache):
    """A tiny VAE trained once per session, for the tests that need one."""
    from ldm_cli.config import VAERunConfig, load_config
    from ldm_cli.training.vae_task import train_vae

    out = tmp_path_factory.mktemp("vae-run")
    cfg = load_config(VAERunConfig, None, tiny_vae_overrides(out, steps=40))
    train_vae(cfg)
    return out / "vae.safetensors"


@pytest.fixture(scope="session")
def trained_denoiser(tmp_path_factory: pytest.TempPathFactory, trained_vae):
    """A tiny denoiser trained once per session on the tiny VAE's latents."""
    from ldm_cli.config import DenoiserRunConfig, load_config
    from ldm_cli.training.denoiser_task import train_denoiser

    out = tmp_path_factory.mktemp("denoiser-run")
    cfg = load_config(DenoiserRunConfig, None, tiny_denoiser_overrides(out, trained_vae, steps=30))
    train_denoiser(cfg)
    return out / "denoiser.safetensors"
