"""Face-quality scores: legibility and attribute KL against their closed forms, a set
scored against itself, reading in batches, the cached reference, and the ordering
held-out faces < VAE reconstructions < decoded prior samples on a tiny trained model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ldm_cli.config import DataConfig
from ldm_cli.data.faces import draw_faces
from ldm_cli.data.pixels import to_float, to_uint8
from ldm_cli.evaluation import face_quality as fq
from ldm_cli.evaluation.face_attributes import HEADS
from ldm_cli.modelfiles.bundles import load_denoiser

RES = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the batches are tiny, and a thread pool only spins on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def network() -> fq.FaceNetwork:
    return fq.load_face_network()


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """12 uint8 faces (3, 16, 16), drawn with a seed no data set here uses."""
    return torch.from_numpy(draw_faces(12, RES, seed=3).transpose(0, 3, 1, 2).copy())


def one_hot(classes: list[int], num_classes: int) -> torch.Tensor:
    """Probabilities whose most probable class is `classes[i]` in row i."""
    p = torch.full((len(classes), num_classes), 0.1 / num_classes, dtype=torch.float64)
    p[torch.arange(len(classes)), torch.tensor(classes)] += 0.9
    return p


# --------------------------------------------------------------------------- closed forms


def test_legibility_is_the_share_of_images_on_which_every_head_reaches_0_9():
    probabilities = {
        "a": torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.9, 0.1], [0.01, 0.99], [0.2, 0.8]], dtype=torch.float64),
        "b": torch.tensor([[0.91, 0.09, 0.0], [0.0, 0.99, 0.01], [0.05, 0.05, 0.9], [0.95, 0.05, 0.0],
                           [0.99, 0.01, 0.0]], dtype=torch.float64),
    }
    # min over heads of the max probability, per image: 0.91, 0.5, 0.9, 0.95, 0.8
    assert fq.legibility(probabilities) == pytest.approx(3 / 5)  # 0.9 itself counts
    assert fq.legibility(probabilities, threshold=0.92) == pytest.approx(1 / 5)
    assert fq.legibility({"a": probabilities["a"]}) == pytest.approx(3 / 5)  # 0.95, 0.9, 0.99


def test_attribute_kl_is_kl_of_smoothed_argmax_histograms_samples_against_reference():
    samples = {"glasses": one_hot([0, 0, 0, 2], 3), "blush": one_hot([1, 0], 2)}
    reference = {"glasses": one_hot([0, 0, 1, 1, 2, 2, 2, 2], 3), "blush": one_hot([0, 1, 1, 0], 2)}
    counts, reference_counts = fq.class_counts(samples), fq.class_counts(reference)
    assert counts["glasses"].tolist() == [3, 0, 1] and reference_counts["glasses"].tolist() == [2, 2, 4]

    kl = fq.attribute_kl(counts, reference_counts)
    p = [3.5 / 5.5, 0.5 / 5.5, 1.5 / 5.5]  # (n_c + ½) / (N + ½·C): the empty class stays finite
    q = [2.5 / 9.5, 2.5 / 9.5, 4.5 / 9.5]
    assert kl["glasses"] == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), rel=1e-12)
    reverse = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    assert abs(kl["glasses"] - reverse) > 1e-3, "the direction is KL(samples ‖ reference)"
    assert kl["blush"] == pytest.approx(0.0, abs=1e-15)  # the same histogram, ½ and ½
    smoothed = fq.attribute_kl(counts, reference_counts, alpha=1.0)["glasses"]
    p1, q1 = [4 / 7, 1 / 7, 2 / 7], [3 / 11, 3 / 11, 5 / 11]
    assert smoothed == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p1, q1)), rel=1e-12)


def test_scores_report_the_mean_kl_over_heads_and_each_head():
    g = torch.Generator().manual_seed(0)
    samples = fq.FaceReadout(torch.randn(6, 4, generator=g),
                             {"glasses": one_hot([0, 0, 0, 0, 1, 1], 2).float(), "blush": one_hot([0, 1] * 3, 2).float()})
    reference = fq.reference_from(fq.FaceReadout(
        torch.randn(8, 4, generator=g),
        {"glasses": one_hot([0, 1] * 4, 2).float(), "blush": one_hot([0, 1] * 4, 2).float()}))
    scores = fq.score_readout(samples, reference)
    p, q = [4.5 / 7, 2.5 / 7], [0.5, 0.5]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert scores.attribute_kl_per_head == pytest.approx({"glasses": expected, "blush": 0.0})
    assert scores.attribute_kl == pytest.approx(expected / 2)
    assert scores.count == 6 and scores.legibility == 1.0  # every row holds 0.9 + 0.05


# --------------------------------------------------------------------------- the network on real faces


def test_a_set_scored_against_itself_has_zero_fd_and_kl_and_full_precision_recall(network, faces):
    readout = fq.read_images(network, faces, batch_size=5)
    scores = fq.score_readout(readout, fq.reference_from(readout))
    assert scores.fd < 1e-6
    assert (scores.precision, scores.recall) == (1.0, 1.0)
    assert scores.attribute_kl == 0.0 and set(scores.attribute_kl_per_head) == {h.name for h in HEADS}
    assert scores.legibility == fq.legibility(readout.probabilities)
    assert scores.count == len(faces)


def test_reading_in_batches_equals_one_pass_and_uint8_equals_float(network, faces, monkeypatch: pytest.MonkeyPatch):
    fed: list[int] = []
    read = fq.FaceNetwork.read

    def counting(self, images):
        fed.append(len(images))
        return read(self, images)

    monkeypatch.setattr(fq.FaceNetwork, "read", counting)
    batched = fq.read_images(network, faces, batch_size=5)
    assert fed == [5, 5, 2]
    whole = fq.read_images(network, to_float(faces), batch_size=len(faces))
    assert batched.features.shape == (12, network.net.feature_dim) == (12, 192)
    torch.testing.assert_close(batched.features, whole.features, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(batched.features, network.net.features(to_float(faces)), rtol=1e-5, atol=1e-5)
    assert list(batched.probabilities) == [h.name for h in HEADS]
    for head in HEADS:
        p = batched.probabilities[head.name]
        assert p.shape == (12, len(head.classes))
        torch.testing.assert_close(p.sum(1), torch.ones(12))


def test_the_reference_is_cached_per_network_and_reused_without_reading_faces(network, tmp_path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    cfg = DataConfig(source="builtin:faces", resolution=RES, builtin_size=40, holdout_fraction=0.25,
                     cache_dir=str(tmp_path))
    built, path, cached = fq.load_or_build_reference(cfg, network, batch_size=16)
    assert not cached and len(built) == 30  # the training faces: 40 minus 10 held out
    assert path.is_file() and path.parent == tmp_path and "-facestats-" in path.name
    assert {name: int(c.sum()) for name, c in built.counts.items()} == {h.name: 30 for h in HEADS}
    subset, subset_path, _ = fq.load_or_build_reference(cfg, network, limit=12, batch_size=16)
    assert len(subset) == 12 and subset_path != path

    monkeypatch.setattr(fq, "training_faces", lambda *args: pytest.fail("training faces read again"))
    again, again_path, cached = fq.load_or_build_reference(cfg, network, batch_size=16)
    assert cached and again_path == path
    for name in ("features", "mu", "sigma", "radii"):
        assert torch.equal(getattr(again, name), getattr(built, name))
    assert all(torch.equal(again.counts[name], c) for name, c in built.counts.items())

    other = dataclasses.replace(network, sha256="0" * 64)  # other weights: other features
    assert fq.reference_path(cfg, other, None) != path
    assert fq.read_reference(path, other) is None


# --------------------------------------------------------------------------- the three references on a tiny model


def test_reconstructions_and_prior_decodes_are_what_the_vae_makes_quantised(trained_denoiser, faces):
    vae = load_denoiser(trained_denoiser).vae
    recon = torch.cat(list(fq.reconstruction_batches(vae, faces, batch_size=5)))
    assert recon.dtype == torch.uint8 and recon.shape == faces.shape
    assert torch.equal(recon, to_uint8(vae.decode(vae.encode(to_float(faces)))))
    prior = torch.cat(list(fq.prior_batches(vae, 7, batch_size=7, seed=3)))
    z = torch.randn((7, *vae.latent_shape), generator=torch.Generator().manual_seed(3))  # normalised latents
    assert torch.equal(prior, to_uint8(vae.decode(z)))


def test_held_out_faces_beat_vae_reconstructions_which_beat_decoded_prior_samples(network, trained_denoiser):
    vae = load_denoiser(trained_denoiser).vae
    cfg = vae.data  # builtin:faces: 96 faces at 16 px, 10 % held out
    reference, _, _ = fq.load_or_build_reference(cfg, network)
    held = fq.heldout_faces(cfg, 10)
    assert len(reference) == 86 and len(held) == 10

    floor = fq.score_faces(held, reference, network, what="held-out faces")
    recon = fq.score_faces(fq.reconstruction_batches(vae, held, 4), reference, network, total=10, what="recon")
    prior = fq.score_faces(fq.prior_batches(vae, 10, 4), reference, network, total=10, what="prior")
    assert floor.count == recon.count == prior.count == 10
    # Measured (40-step VAE): FD 55 < 68 < 87, KID −0.07 < 0.50 < 1.18, recall 0.98 vs 0.00.
    assert floor.fd < recon.fd < prior.fd
    assert floor.fd < 0.8 * prior.fd
    assert floor.kid_mean < recon.kid_mean < prior.kid_mean
    assert floor.recall > prior.recall + 0.5
    assert floor.attribute_kl < prior.attribute_kl
