"""Shared test set-up: a private image cache and small, fast configs."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Never touch the user's ~/.cache/ldm; share one cache across the session."""
    cache = tmp_path_factory.mktemp("ldm-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LDM_CACHE_DIR", str(cache))
    yield cache
    mp.undo()
