"""Behaviour is pinned: a tiny train-vae → train-denoiser → sample run gives bitwise the
files recorded in tests/golden/tiny-run.json for this platform (see tests/golden_run.py)."""

from __future__ import annotations

import pytest

from golden_run import platform, read_records, record_for, tiny_run


@pytest.mark.slow
def test_tiny_run_reproduces_the_recorded_digests(tmp_path):
    record = record_for(platform())
    if record is None:
        recorded = [r["platform"] for r in read_records()]
        pytest.skip(f"digests were recorded on {recorded}, this is {platform()}: "
                    "floating-point results differ between builds and CPUs")
    assert tiny_run(tmp_path) == record["digests"]
