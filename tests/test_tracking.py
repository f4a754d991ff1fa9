"""Experiment tracking: a run with `report_to = ["tensorboard"]` writes an event file whose
scalars and preview images read back; a tracker that is not installed is refused."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import tiny_vae_overrides
from ldm_cli.config import VAERunConfig, load_config
from ldm_cli.errors import UsageError
from ldm_cli.training.vae_task import train_vae


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason='needs the tensorboard extra: pip install "ldm-cli[tensorboard]"')
def test_a_tensorboard_run_logs_losses_lr_beta_grad_norm_and_previews(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train_vae(load_config(VAERunConfig, None, tiny_vae_overrides(run, 12) + ['logging.report_to=["tensorboard"]']))
    folder = run / "tracking" / "vae"  # the run's events; the hyperparameters sit in a subfolder
    assert list(folder.glob("events.out.tfevents.*"))
    log = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = log.Tags()
    for name in ("loss", "reconstruction", "kl", "beta", "lr", "grad_norm"):
        assert name in tags["scalars"], tags
    losses = log.Scalars("loss")
    assert [e.step for e in losses] == list(range(1, 13))
    assert losses[-1].value < losses[0].value, "the logged loss is the run's, and it falls"
    betas = [e.value for e in log.Scalars("beta")]
    assert betas[0] > betas[-1], "β decays"
    previews = log.Images("previews")
    assert [e.step for e in previews] == [10, 12] and previews[0].width > 0


def test_a_tracker_that_is_not_installed_is_refused_naming_the_install(tmp_path, monkeypatch):
    import ldm_cli.training.tracking as tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    run = tmp_path / "run"
    with pytest.raises(UsageError, match=r'logging.report_to: tensorboard is not installed; pip install "ldm-cli\[tensorboard\]"'):
        train_vae(load_config(VAERunConfig, None, tiny_vae_overrides(run, 2) + ['logging.report_to=["tensorboard"]']))
    assert not run.exists()
