"""Reference statistics kept between evaluations: one safetensors file in the data cache
folder, named by the reference and keyed by everything its numbers depend on.

Both reference kinds use it: Inception/TorchScript features (`-fidstats-`) and the
face-attribute network's (`-facestats-`). A file is reused only when its metadata says
the same format and network, and its tensors have consistent shapes; anything else is
computed again (never trusted, never unpickled).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldm_cli.common.files import atomic_write
from ldm_cli.config import DataConfig
from ldm_cli.data.cache import cache_dir_for, cache_stem
from ldm_cli.data.sources import resolve_source
from ldm_cli.evaluation.distances import KID_SUBSET_SIZE, KID_SUBSETS, PR_K, PR_MAX_IMAGES, SUBSET_SEED

logger = logging.getLogger("ldm")


def cache_path(cfg: DataConfig, tag: str, identity: dict[str, Any]) -> Path:
    """`<reference stem>-<tag>-<key>.safetensors`; the key hashes `identity` and the
    KID / precision-recall settings the stored numbers were made with."""
    keyed = {**identity, "kid": [KID_SUBSETS, KID_SUBSET_SIZE], "pr": [PR_K, PR_MAX_IMAGES, SUBSET_SEED]}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir_for(cfg) / f"{cache_stem(resolve_source(cfg), cfg.resolution)}-{tag}-{key}.safetensors"


def read_cached(path: Path, fmt: int, network: str, what: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a cached file of this format and network, or None (missing,
    unreadable — with a warning — or made by something else)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        logger.warning("%s '%s': unreadable (%s); computing it again", what, path, err)
        return None
    if meta.get("format") != str(fmt) or meta.get("network") != network:
        return None
    return tensors


def consistent_stats(tensors: dict[str, torch.Tensor]) -> bool:
    """Features (N, D) with their mean (D,), covariance (D, D) and k-NN radii."""
    try:
        n, d = tensors["features"].shape
        return (tensors["mu"].shape == (d,) and tensors["sigma"].shape == (d, d)
                and len(tensors["radii"]) in (0, min(n, PR_MAX_IMAGES)))
    except (KeyError, ValueError):
        return False


def write_cached(path: Path, tensors: dict[str, torch.Tensor], fmt: int, network: str, **metadata: str) -> None:
    """Write the tensors as safetensors with their format and network, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": str(fmt), "network": network, **metadata}
    with atomic_write(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
