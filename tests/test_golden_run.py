"""Behaviour is pinned: a tiny train-vae → train-denoiser → sample run gives bitwise the
files recorded in tests/golden/tiny-run.json (see tests/golden_run.py)."""

from __future__ import annotations

import json

import pytest

from golden_run import GOLDEN, platform, tiny_run


@pytest.mark.slow
def test_tiny_run_reproduces_the_recorded_digests(tmp_path):
    record = json.loads(GOLDEN.read_text())
    if record["platform"] != platform():
        pytest.skip(f"digests were recorded on {record['platform']}, this is {platform()}: "
                    "floating-point results differ between builds and CPUs")
    assert tiny_run(tmp_path) == record["digests"]
