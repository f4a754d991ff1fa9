"""`ldm evaluate`: the distances against closed forms, and the plumbing with a tiny network."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_cli.commands import evaluate as ev
from ldm_cli.data.faces import draw_face
from ldm_cli.errors import UsageError
from ldm_cli.evaluation import distances
from ldm_cli.evaluation.features import INCEPTION_FILE, FeatureNetwork, load_inception, read_state_dict

RES = 16

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a busy shared machine a thread
    pool spins on every small matmul (the file takes ~5 s this way, over a minute with 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


def random_spd(d: int, seed: int) -> torch.Tensor:
    """A random symmetric positive definite matrix in float64."""
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def write_faces(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        draw_face(i, RES, seed).save(folder / f"{i:06d}.png")
    return folder


def write_solids(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        Image.new("RGB", (RES, RES), colour).save(folder / f"{i:06d}.png")
    return folder


class TinyFeatures(torch.nn.Module):
    """A fixed random conv, ReLU and global pooling: 8 mean + 8 max + 3 colour features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x * 2 - 1))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3)), x.mean((2, 3))], 1)


class FixedSize(torch.nn.Module):
    """Only accepts 16×16 inputs (a linear layer on the flattened image)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class NotFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((1, 2, 3))  # (N,), not (N, D)


def script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return script(TinyFeatures(), tmp_path_factory.mktemp("net") / "tiny.pt")


@pytest.fixture(scope="module")
def faces_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_faces(tmp_path_factory.mktemp("faces-a"), 24, seed=1)


@pytest.fixture(scope="module")
def faces_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_faces(tmp_path_factory.mktemp("faces-b"), 24, seed=2)


@pytest.fixture(scope="module")
def solids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_solids(tmp_path_factory.mktemp("solids"), 24)


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "ldm-cache"
    monkeypatch.setenv("LDM_CACHE_DIR", str(cache))
    return cache


def evaluate(samples: Path, reference: str | Path, net: Path, **kwargs) -> ev.EvaluationReport:
    return ev.run_evaluate(samples, str(reference), features=net, batch_size=kwargs.pop("batch_size", 7),
                           device="cpu", **kwargs)


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    expected = (mu1 - mu2).pow(2).sum() + (a + b - 2 * (a * b).sqrt()).sum()
    assert distances.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(float(expected), rel=1e-10)


def test_frechet_distance_of_non_commuting_2d_gaussians_is_closed_form():
    # For 2×2 matrices with non-negative eigenvalues: Tr √M = √(Tr M + 2√det M); here M = Σ1Σ2.
    s1, s2 = random_spd(2, 1), random_spd(2, 2)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.25], dtype=torch.float64)
    tr_sqrt = math.sqrt(float((s1 @ s2).trace()) + 2 * math.sqrt(float(torch.det(s1) * torch.det(s2))))
    expected = float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace()) - 2 * tr_sqrt
    assert distances.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_general_eigenvalues_in_higher_dimension():
    s1, s2 = random_spd(20, 3), random_spd(20, 4)
    mu1, mu2 = torch.zeros(20, dtype=torch.float64), torch.full((20,), 0.3, dtype=torch.float64)
    eigenvalues = np.linalg.eigvals((s1 @ s2).numpy())  # non-symmetric product: real, non-negative eigenvalues
    tr_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    expected = float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace()) - 2 * tr_sqrt
    assert distances.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_zero_on_itself_and_symmetric_even_when_singular():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(10, 30, generator=g), torch.randn(12, 30, generator=g) + 0.5  # rank < D: singular Σ
    mx, sx = distances.gaussian_stats(x)
    my, sy = distances.gaussian_stats(y)
    assert abs(distances.frechet_distance(mx, sx, mx, sx)) < 1e-8
    assert distances.frechet_distance(mx, sx, my, sy) == pytest.approx(distances.frechet_distance(my, sy, mx, sx), rel=1e-9)
    assert distances.frechet_distance(mx, sx, my, sy) > 1.0


def test_gaussian_stats_in_chunks_match_numpy(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(distances, "STATS_CHUNK", 7)
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(2)) * 3 + 10
    mu, sigma = distances.gaussian_stats(x)
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-10)


# --------------------------------------------------------------------------- KID


def test_mmd2_unbiased_matches_a_direct_sum():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    m = 5
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert distances.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same_mean, same_std = distances.kernel_distance(x, y, subsets=50, subset_size=200)
    shifted_mean, shifted_std = distances.kernel_distance(x, y + 0.5, subsets=50, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 10 * max(same_std, abs(same_mean))
    assert shifted_mean > 5 * shifted_std


# --------------------------------------------------------------------------- precision and recall


def test_knn_radii_match_brute_force(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(distances, "DISTANCE_CHUNK", 6)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    brute = torch.cdist(x, x).sort(dim=1).values[:, 3]  # column 0 is the point itself
    torch.testing.assert_close(distances.knn_radii(x, k=3), brute, rtol=1e-9, atol=1e-9)


def test_precision_recall_is_one_on_copies_zero_far_away_and_half_when_half_off():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(60, 8, generator=g)
    assert distances.precision_recall(real, real.clone()) == (1.0, 1.0)
    assert distances.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Half the fakes on the real data, half far away: precision ½; the fakes cover what they sit on.
    fake = torch.cat([real[:30], real[30:] + 100.0])
    precision, recall = distances.precision_recall(real, fake)
    assert precision == pytest.approx(0.5)
    assert 0.4 <= recall < 1.0


# --------------------------------------------------------------------------- end to end, tiny network


def test_evaluate_ranks_similar_above_different_and_reuses_cached_reference(tiny_net, faces_a, faces_b, solids, private_cache,
                                                       monkeypatch: pytest.MonkeyPatch):
    fed: list[int] = []
    original_call = FeatureNetwork.__call__

    def counting_call(self, images):
        fed.append(len(images))
        return original_call(self, images)

    monkeypatch.setattr(FeatureNetwork, "__call__", counting_call)
    itself = evaluate(faces_a, faces_a, tiny_net)
    assert sum(fed) == 2 * 24  # reference and samples
    assert max(fed) <= 7  # in batches
    assert abs(itself.fid) < 1e-6
    assert (itself.precision, itself.recall) == (1.0, 1.0)
    assert (itself.n_samples, itself.n_reference, itself.resolution) == (24, 24, RES)
    assert itself.network == "torchscript tiny.pt"
    assert not itself.reference_cached
    assert itself.reference_cache.is_file() and itself.reference_cache.parent == private_cache
    assert itself.reference_cache.suffix == ".safetensors"

    # Later calls: the reference images are neither loaded nor fed through the network.
    fed.clear()
    monkeypatch.setattr(ev, "load_images", lambda cfg: pytest.fail("reference images reloaded"))
    mtime = itself.reference_cache.stat().st_mtime_ns
    similar = evaluate(faces_b, faces_a, tiny_net)  # other faces, same distribution
    different = evaluate(solids, faces_a, tiny_net)
    assert sum(fed) == 2 * 24  # the samples only
    assert similar.reference_cached and different.reference_cached
    assert different.reference_cache == itself.reference_cache
    assert itself.reference_cache.stat().st_mtime_ns == mtime
    assert 1e-3 < similar.fid < different.fid / 3
    assert 0 < similar.kid_mean < different.kid_mean / 3
    assert different.precision < similar.precision and different.recall < similar.recall
    # The very same points make the unbiased KID negative: its cross term includes each
    # pair (x, x), which the within-set terms leave out. (Independent draws: ≈ 0, above.)
    assert itself.kid_mean < 0


def test_evaluate_against_builtin_faces_reads_an_ldm_sample_folder(tiny_net, solids, tmp_path):
    run = tmp_path / "samples"  # the layout `ldm sample -o` writes
    write_faces(run / "images", 16, seed=7)
    Image.new("RGB", (4 * RES, 4 * RES)).save(run / "grid.png")
    faces = evaluate(run, "builtin:faces", tiny_net, num_reference=32)
    colours = evaluate(solids, "builtin:faces", tiny_net, num_reference=32)
    assert (faces.n_samples, faces.n_reference, faces.resolution) == (16, 32, RES)
    assert 0 < faces.fid < colours.fid
    assert faces.kid_mean < colours.kid_mean


def test_num_reference_takes_a_subset_and_features_size_resizes(tiny_net, faces_a, solids):
    report = evaluate(solids, faces_a, tiny_net, num_reference=10, features_size=24)
    assert report.n_reference == 10 and report.network == "torchscript tiny.pt @24px"


def test_too_few_images_for_precision_recall_still_gives_fid(tiny_net, faces_a, tmp_path):
    two = write_faces(tmp_path / "two", 2, seed=3)
    report = evaluate(two, faces_a, tiny_net)
    assert report.n_samples == 2 and math.isfinite(report.fid) and math.isfinite(report.kid_mean)
    assert report.precision is None and report.recall is None


# --------------------------------------------------------------------------- bad inputs


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_empty_or_one_image_samples_folder_is_a_usage_error(tiny_net, faces_a, tmp_path):
    with pytest.raises(UsageError) as err:
        evaluate(tmp_path / "nowhere", faces_a, tiny_net)
    assert_one_line(err, "nowhere", "no such folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as err:
        evaluate(tmp_path / "empty", faces_a, tiny_net)
    assert_one_line(err, "empty", "no images")
    one = write_faces(tmp_path / "one", 1, seed=0)
    with pytest.raises(UsageError) as err:
        evaluate(one, faces_a, tiny_net)
    assert_one_line(err, str(one), "at least 2")


def test_one_image_or_missing_reference_is_a_usage_error(tiny_net, faces_a, tmp_path):
    one = write_faces(tmp_path / "one-ref", 1, seed=0)
    with pytest.raises(UsageError) as err:
        evaluate(faces_a, one, tiny_net)
    assert_one_line(err, "at least 2")
    with pytest.raises(UsageError) as err:
        evaluate(faces_a, tmp_path / "no-such-data", tiny_net)
    assert_one_line(err, "no-such-data")


def test_missing_default_inception_weights_name_the_path(faces_a, tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(UsageError) as err:
        ev.run_evaluate(faces_a, str(faces_a), batch_size=8, device="cpu")
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION_FILE
    assert_one_line(err, str(expected), "--inception-weights PATH")
    assert err.value.exit_code == 2


def test_missing_weights_or_features_file_is_a_usage_error_naming_it(faces_a, tmp_path):
    with pytest.raises(UsageError) as err:
        ev.run_evaluate(faces_a, str(faces_a), inception_weights=tmp_path / "gone.pth", device="cpu")
    assert_one_line(err, "gone.pth", "no such file")
    with pytest.raises(UsageError) as err:
        ev.run_evaluate(faces_a, str(faces_a), features=tmp_path / "gone.pt", device="cpu")
    assert_one_line(err, "gone.pt", "no such file")


def test_invalid_features_files_are_usage_errors(faces_a, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a network")
    with pytest.raises(UsageError) as err:
        evaluate(faces_a, faces_a, junk)
    assert_one_line(err, "junk.pt", "not a TorchScript file")
    with pytest.raises(UsageError) as err:
        evaluate(faces_a, faces_a, script(NotFeatures(), tmp_path / "flat.pt"))
    assert_one_line(err, "flat.pt", "expected a tensor of shape (N, D)")
    with pytest.raises(UsageError) as err:
        evaluate(faces_a, faces_a, script(FixedSize(), tmp_path / "fixed.pt"), features_size=20)
    assert_one_line(err, "fixed.pt", "failed on a batch of shape", "--features-size")


def test_features_with_inception_weights_zero_batch_or_one_reference_are_refused(tiny_net, faces_a, tmp_path):
    with pytest.raises(UsageError, match="pass only one"):
        ev.run_evaluate(faces_a, str(faces_a), features=tiny_net, inception_weights=tmp_path / "w.pth", device="cpu")
    with pytest.raises(UsageError, match="--batch-size"):
        evaluate(faces_a, faces_a, tiny_net, batch_size=0)
    with pytest.raises(UsageError, match="--num-reference"):
        evaluate(faces_a, faces_a, tiny_net, num_reference=1)


class Payload:
    """Unpickling this would create a folder: proof that a loader ran pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_as_inception_weights_is_refused_without_running_it(faces_a, tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {"conv.weight": torch.zeros(1), "payload": Payload(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(UsageError) as err:
        ev.run_evaluate(faces_a, str(faces_a), inception_weights=path, device="cpu")
    assert_one_line(err, "evil.pth", "never runs pickled code")
    assert not marker.exists()


def test_weights_of_another_network_are_refused(faces_a, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UsageError) as err:
        ev.run_evaluate(faces_a, str(faces_a), inception_weights=path, device="cpu")
    assert_one_line(err, "other.safetensors", "not torchvision Inception v3 weights")


def test_inception_from_local_weights_gives_2048_features(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    pth, st = tmp_path / INCEPTION_FILE, tmp_path / "inception.safetensors"
    torch.save(state, pth)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    assert read_state_dict(pth).keys() == state.keys()  # weights_only=True reads a plain state dict
    net = load_inception(st, torch.device("cpu"))
    assert net.prepare(torch.zeros(1, 3, RES, RES, dtype=torch.uint8)).shape == (1, 3, 299, 299)
    features = net(torch.randint(0, 256, (1, 3, RES, RES), dtype=torch.uint8))  # one image: ~0.5 s of CPU
    assert features.shape == (1, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all()


# --------------------------------------------------------------------------- the command (once wired)


def evaluate_command_wired() -> bool:
    from ldm_cli.cli import app

    return any(command.name == "evaluate" for command in app.registered_commands)


@pytest.mark.skipif(not evaluate_command_wired(), reason="`ldm evaluate` is not wired into the CLI yet")
def test_evaluate_command_prints_scores_and_reports_missing_weights(tiny_net, faces_a, faces_b, tmp_path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--samples", str(faces_b), "--reference", str(faces_a),
                                 "--features", str(tiny_net), "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    for name in ("FID", "KID", "precision", "recall"):
        assert name in result.stdout
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    result = runner.invoke(app, ["evaluate", "--samples", str(faces_b), "--reference", str(faces_a)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("ldm: error:")]
    assert len(errors) == 1 and INCEPTION_FILE in errors[0]


# --------------------------------------------------------------------------- builtin:faces: the face-attribute network


@pytest.fixture
def no_inception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Inception weights anywhere, and no runs/denoiser/denoiser.safetensors in the working folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="module")
def sampled(trained_denoiser: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 samples of the tiny denoiser, as `ldm sample -o` writes them (with sample.json)."""
    from ldm_cli.commands.sample import run_sample

    out = tmp_path_factory.mktemp("sampled") / "samples"
    run_sample(trained_denoiser, out, num_samples=10, sampler="ddim", steps=4, batch_size=10,
               device=torch.device("cpu"))
    return out


def test_sample_records_its_checkpoint_sampler_steps_seed_and_precision(sampled, trained_denoiser):
    from ldm_cli.common.device import resolve_precision

    record = json.loads((sampled / "sample.json").read_text())
    assert record == {"checkpoint": str(trained_denoiser.resolve()), "sampler": "ddim", "steps": 4, "seed": 42,
                      "precision": resolve_precision("auto", "cpu")}


def test_sample_json_is_claimed_like_the_other_outputs(trained_denoiser, tmp_path):
    from ldm_cli.commands.sample import run_sample

    out = tmp_path / "samples"
    out.mkdir()
    (out / "sample.json").write_text("{}")
    with pytest.raises(UsageError) as err:
        run_sample(trained_denoiser, out, num_samples=1, sampler="ddim", steps=2, device=torch.device("cpu"))
    assert_one_line(err, "sample.json' already exists", "--overwrite")
    assert (out / "sample.json").read_text() == "{}" and not (out / "images").exists()


def test_builtin_faces_needs_no_weights_and_scores_samples_beside_three_references(sampled, trained_denoiser,
                                                                                  no_inception, tmp_path):
    from ldm_cli.common.files import file_sha256
    from ldm_cli.evaluation.face_attributes import HEADS, default_weights_path

    out = tmp_path / "scores" / "faces.json"
    report = ev.run_evaluate(sampled, "builtin:faces", batch_size=4, device="cpu", json_path=out)
    assert isinstance(report, ev.FaceEvaluationReport)
    assert report.checkpoint == trained_denoiser.resolve()  # named by sample.json
    assert report.n_reference == 86 and report.resolution == RES  # the model's split: 96 faces, 10 held out
    scores = report.scores
    assert list(scores) == ["samples", "floor", "vae_reconstruction", "prior"]
    assert [s.count for s in scores.values()] == [10, 10, 10, 10]
    assert scores["floor"].fd < scores["prior"].fd and scores["floor"].kid_mean < scores["prior"].kid_mean

    lines = ev.format_report(report)
    assert lines[1].split() == ["samples", "floor", "VAE", "recon", "prior"]
    rows = {line[:13].strip(): line[13:].split() for line in lines[2:9]}
    assert list(rows) == ["FD", "KID ×1000", "precision", "recall", "legibility", "attribute KL", "images"]
    assert rows["FD"] == [f"{s.fd:.3f}" for s in scores.values()]
    assert rows["images"] == ["10"] * 4
    assert lines[9].startswith("lower is better for FD, KID and attribute KL, higher for precision")
    assert f"numbers written to {out}" in lines

    saved = json.loads(out.read_text())
    assert saved["network"]["sha256"] == file_sha256(default_weights_path())
    assert saved["network"]["feature_dim"] == 192 and saved["checkpoint"] == str(trained_denoiser.resolve())
    assert saved["reference"]["count"] == 86 and saved["reference"]["holdout_fraction"] == 0.1
    for key, value in scores.items():
        assert saved["sets"][key] == value.to_dict()  # JSON keeps floats exactly
        assert set(saved["sets"][key]["attribute_kl_per_head"]) == {h.name for h in HEADS}


def test_without_a_model_only_the_floor_is_printed_with_how_to_get_the_rest(no_inception, tmp_path):
    samples = write_faces(tmp_path / "faces", 12, seed=5)
    report = ev.run_evaluate(samples, "builtin:faces", batch_size=64, num_reference=300, device="cpu")
    assert report.checkpoint is None and report.n_reference == 300  # of the default split's 3891 training faces
    assert report.scores["vae_reconstruction"] is None and report.scores["prior"] is None
    assert report.scores["floor"].count == 12  # the default split holds out 205
    lines = ev.format_report(report)
    assert lines[1].split() == ["samples", "floor"]
    assert any("--checkpoint" in line and "sample.json" in line for line in lines)

    (samples / "sample.json").write_text(json.dumps({"checkpoint": str(tmp_path / "gone.safetensors")}))
    report = ev.run_evaluate(samples, "builtin:faces", batch_size=64, num_reference=300, device="cpu")
    assert report.reference_cached and report.scores["prior"] is None
    assert "gone.safetensors" in report.note and "--checkpoint" in report.note


def test_a_checkpoint_of_another_resolution_or_without_the_face_network_is_refused(trained_denoiser, tiny_net,
                                                                                  faces_a, no_inception, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):
        draw_face(i, 2 * RES, 1).save(big / f"{i:06d}.png")
    with pytest.raises(UsageError) as err:
        ev.run_evaluate(big, "builtin:faces", checkpoint=trained_denoiser, device="cpu")
    assert_one_line(err, str(trained_denoiser), "16px", "32px")
    with pytest.raises(UsageError) as err:
        evaluate(faces_a, faces_a, tiny_net, checkpoint=trained_denoiser)
    assert_one_line(err, "--checkpoint", "builtin:faces")


def test_json_is_claimed_before_any_work_and_written_for_any_network(tiny_net, faces_a, faces_b, tmp_path):
    out = tmp_path / "scores.json"
    out.write_text("keep")
    with pytest.raises(UsageError) as err:
        evaluate(faces_b, faces_a, tiny_net, json_path=out)
    assert_one_line(err, "scores.json' already exists", "--overwrite")
    assert out.read_text() == "keep"
    report = evaluate(faces_b, faces_a, tiny_net, json_path=out, overwrite=True)
    saved = json.loads(out.read_text())
    assert saved["network"] == "torchscript tiny.pt" and saved["fid"] == pytest.approx(report.fid)
    assert saved["n_samples"] == 24 and saved["precision"] == pytest.approx(report.precision)


def evaluate_options() -> set[str]:
    import typer.main

    from ldm_cli.cli import app

    command = typer.main.get_command(app).commands.get("evaluate")
    return {name for param in (command.params if command else []) for name in getattr(param, "opts", [])}


@pytest.mark.skipif(not {"--checkpoint", "--json", "--overwrite"} <= evaluate_options(),
                    reason="--checkpoint, --json and --overwrite are not wired into `ldm evaluate` yet")
def test_evaluate_command_on_builtin_faces_prints_the_table_and_writes_json(sampled, no_inception, tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    out = tmp_path / "faces.json"
    args = ["evaluate", "--samples", str(sampled), "--reference", "builtin:faces", "--batch-size", "4", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if line.split()[:2] == ["samples", "floor"])
    assert header.split() == ["samples", "floor", "VAE", "recon", "prior"]
    assert "lower is better for FD" in result.stdout
    assert json.loads(out.read_text())["sets"]["prior"]["count"] == 10
    again = CliRunner().invoke(app, args)
    errors = [line for line in again.stderr.splitlines() if line.startswith("ldm: error:")]
    assert again.exit_code == 2 and len(errors) == 1 and "already exists" in errors[0]
