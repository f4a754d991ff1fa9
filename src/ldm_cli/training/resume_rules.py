"""Which settings a resumed run may change: refused, warned about, or taken silently.

`--resume` continues a run bit for bit only with the settings it began with. Some
changes make the checkpoint meaningless (another model or another noise schedule:
refused, exit 2); some keep it usable but break exactness (another batch size, data,
seed or learning rate: a warning naming each key); the rest only change how long the
run goes, how it logs, or how fast it computes (taken silently).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ldm_cli.config import RunConfig, load_config
from ldm_cli.errors import ConfigError, UsageError

logger = logging.getLogger("ldm")

REFUSED = ("model.", "diffusion.")  # the checkpoint's weights mean nothing under other values
SILENT = ("train.max_steps", "logging.", "output.", "quality.", "train.compile", "train.channels_last", "train.tf32",
          "latents.vae")  # the VAE file itself is compared by its digest (`identity`), not its path


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 0}} → {"train.seed": 0}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: RunConfig, after: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: {key: (before, after)}."""
    old, new = flatten(before.model_dump(mode="json")), flatten(after.model_dump(mode="json"))
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {before!r} → {after!r}" for key, (before, after) in changes.items())


def check_resume_settings(run_dir: Path, config_file: str, config: RunConfig) -> None:
    """Compare `config` with the run's saved config: refuse or warn, naming the keys."""
    saved_path = run_dir / config_file
    try:
        saved = load_config(type(config), saved_path)
    except ConfigError:
        logger.warning(f"--resume: '{saved_path}' does not load; cannot tell which settings changed")
        return
    changes = changed_settings(saved, config)
    refused = {k: v for k, v in changes.items() if k.startswith(REFUSED)}
    if refused:
        raise UsageError(
            f"--resume: {describe(refused)}: the run's checkpoints were trained with the old values; "
            "keep them, or start a new run with another --out (or --overwrite)"
        )
    warned = {k: v for k, v in changes.items() if not k.startswith(SILENT)}
    if warned:
        logger.warning(f"--resume with changed settings: {describe(warned)}; the run continues, but no longer "
                       "matches a run trained straight through")
