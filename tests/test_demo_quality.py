"""The demo's own configs, trained briefly, sample faces that score between the decoded
prior (what a denoiser starts from) and held-out real faces (the floor), as `ldm
evaluate --samples DIR --reference builtin:faces` reports them."""

from __future__ import annotations

import pytest

from ldm_cli.commands.demo import demo_denoiser_config, demo_vae_config
from ldm_cli.commands.evaluate import run_evaluate
from ldm_cli.commands.sample import run_sample
from ldm_cli.training.denoiser_task import train_denoiser
from ldm_cli.training.vae_task import train_vae

SCALE = 0.2  # a fifth of the quickstart configs' updates
NUM_IMAGES = 96


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("short-demo")
    train_vae(demo_vae_config(folder, SCALE))
    train_denoiser(demo_denoiser_config(folder, SCALE, ["quality.every=0"]))
    denoiser = folder / "denoiser" / "denoiser.safetensors"
    run_sample(denoiser, folder / "samples", num_samples=NUM_IMAGES, seed=0, sampler="ddim", steps=20,
               batch_size=NUM_IMAGES)
    return run_evaluate(folder / "samples" / "images", "builtin:faces", checkpoint=denoiser, batch_size=NUM_IMAGES)


def test_samples_score_clearly_between_the_decoded_prior_and_real_faces(evaluated):
    scores = evaluated.scores
    samples, floor, prior = scores["samples"], scores["floor"], scores["prior"]
    assert samples.count == floor.count == prior.count == NUM_IMAGES
    assert 2 * floor.fd < samples.fd < prior.fd / 2, (floor.fd, samples.fd, prior.fd)
    assert floor.legibility > samples.legibility >= prior.legibility


def test_vae_reconstructions_lie_between_the_floor_and_the_prior(evaluated):
    scores = evaluated.scores
    assert scores["floor"].fd < scores["vae_reconstruction"].fd < scores["prior"].fd
