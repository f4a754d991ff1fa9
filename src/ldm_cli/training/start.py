"""How a command finds what it works on: the run config from file, `--set` and flags, and
the model files it defaults to when none is named.

    config     --config FILE (a `configs/…` path not found here falls back to the
               packaged config of that name), else the packaged quickstart config;
               then `--set section.key=value`, then plain flags (--out, --max-steps, …).
               On --resume without --config, the run's own config.toml is the file.
    start      --resume, --overwrite, or --auto-resume (resume when the run folder holds
               a checkpoint, else start over: what a requeued SLURM job wants).
    models     a command that needs a VAE or a denoiser and is given none uses the one the
               default training run writes (runs/vae/vae.safetensors,
               runs/denoiser/denoiser.safetensors), and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ldm_cli.config import DenoiserRunConfig, RunConfigT, VAERunConfig, load_config, packaged_config
from ldm_cli.errors import UsageError
from ldm_cli.training import rundir

logger = logging.getLogger("ldm")

PACKAGED_PREFIX = "configs"
QUICKSTART = {VAERunConfig: "quickstart/vae.toml", DenoiserRunConfig: "quickstart/denoiser.toml"}
TRAIN_COMMAND = {"vae": "ldm train-vae", "denoiser": "ldm train-denoiser --vae runs/vae/vae.safetensors"}


def config_path(given: Path | None, schema: type[RunConfigT]) -> Path:
    """The config file to read: the one given, or the packaged one it names, or the
    packaged quickstart config."""
    if given is None:
        return packaged_config(QUICKSTART[schema])
    if given.exists() or not given.parts or given.parts[0] != PACKAGED_PREFIX:
        return given
    packaged = packaged_config(Path(*given.parts[1:]).as_posix())
    if packaged.is_file():
        logger.info(f"'{given}' is not in this folder: using the packaged config of that name")
        return packaged
    return given


def resolve_run(
    schema: type[RunConfigT], config: Path | None, sets: list[str] | None, flags: dict[str, Any],
    resume: bool, overwrite: bool, auto_resume: bool,
) -> tuple[RunConfigT, bool, bool]:
    """The run config and how the run starts: (config, resume, overwrite).

    `flags` maps dotted keys to the values of plain options (None when not given).
    """
    updates = {key: value for key, value in flags.items() if value is not None}
    cfg = load_config(schema, config_path(config, schema), sets or [], updates)
    run_dir = Path(cfg.output.dir)
    if auto_resume:
        if resume or overwrite:
            raise UsageError("--auto-resume decides between --resume and --overwrite itself; pass only one of them")
        resume = rundir.latest_checkpoint(run_dir) is not None
        overwrite = not resume
    saved = run_dir / rundir.CONFIG_FILE
    if resume and config is None and saved.is_file():
        cfg = load_config(schema, saved, sets or [], updates)
    return cfg, resume, overwrite


def default_model_file(kind: str) -> Path:
    """Where the default training run of `kind` ("vae" or "denoiser") exports its model."""
    schema = VAERunConfig if kind == "vae" else DenoiserRunConfig
    return Path(schema().output.dir) / rundir.export_name(kind)


def model_file(given: Path | str | None, kind: str, flag: str) -> Path:
    """The model file a command works on: the one given, else the default run's, said aloud."""
    if given is not None:
        return Path(given)
    default = default_model_file(kind)
    if not default.is_file():
        raise UsageError(f"no {flag} given, and there is no {default} here to use; "
                         f"train one with `{TRAIN_COMMAND[kind]}` or pass {flag} FILE")
    logger.info(f"using {default} (pass {flag} to choose another)")
    return default
