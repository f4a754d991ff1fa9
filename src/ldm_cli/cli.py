"""The `ldm` command: one small function per subcommand over functions tests can call.

Errors a user can cause (`ldm_cli.errors.LdmError`) become one line on stderr and the
exit code DESIGN.md gives them: 2 for usage and configuration, 1 at run time.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from ldm_cli.config import VAERunConfig, load_config, packaged_config
from ldm_cli.errors import LdmError
from ldm_cli.progress import setup_logging

app = typer.Typer(
    name="ldm",
    help="Latent diffusion toolkit: train a β-VAE and a v-prediction ConvNeXt U-Net, then sample with DDPM/DDIM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def reports_errors(command: Callable) -> Callable:
    """Turn an `LdmError` into one `ldm: error: …` line per problem and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return command(*args, **kwargs)
        except LdmError as err:
            for line in str(err).splitlines() or [type(err).__name__]:
                err_console.print(f"ldm: error: {line}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("ldm: interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper


# --------------------------------------------------------------------------- shared options

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (default: the packaged quickstart config).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable).")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Image folder, .zip of images, or builtin:faces (sets data.source).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (sets output.dir).")]
StepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer updates (sets train.max_steps).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (sets train.seed).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in the output directory from its newest checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start over in an output directory that already holds a run.")]


def resolve_config(schema, default_name: str, config: Path | None, sets: list[str] | None, resume: bool,
                   updates: dict[str, Any]):
    """The run config: --config (or, on --resume, the run's own config.toml, or the packaged
    default), then --set overrides, then the plain flags."""
    updates = {k: v for k, v in updates.items() if v is not None}
    path = config
    if path is None and resume:
        out = updates.get("output.dir") or load_config(schema, packaged_config(default_name)).output.dir
        saved = Path(out) / "config.toml"
        path = saved if saved.is_file() else None
    if path is None:
        path = packaged_config(default_name)
    return load_config(schema, path, sets or [], updates)


def print_training_result(result, what: str) -> None:
    state = "stopped on a signal at" if result.preempted else "finished at"
    console.print(
        f"{what} {state} step {result.final_step}: {result.steps_done} updates in {result.seconds:.1f} s "
        f"({result.steps_per_second:.2f} steps/s, {result.world_size} process(es))"
        + (f"; {result.skipped_nonfinite} non-finite updates skipped" if result.skipped_nonfinite else "")
    )
    if result.export_path is not None:
        console.print(f"exported {result.export_path}")


# --------------------------------------------------------------------------- commands


@app.command("train-vae")
@reports_errors
def train_vae_command(
    config: ConfigOpt = None, set_: SetOpt = None, data: DataOpt = None, out: OutOpt = None,
    max_steps: StepsOpt = None, seed: SeedOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
) -> None:
    """Train a β-VAE (β decays over training) that maps images to a small continuous latent space."""
    from ldm_cli.train_vae import train_vae
    from ldm_cli.training import EXIT_PREEMPTED

    cfg = resolve_config(VAERunConfig, "quickstart/vae.toml", config, set_, resume, {
        "data.source": data, "output.dir": str(out) if out else None,
        "train.max_steps": max_steps, "train.seed": seed,
    })
    result = train_vae(cfg, resume=resume, overwrite=overwrite)
    print_training_result(result, "train-vae")
    if result.preempted:
        raise typer.Exit(EXIT_PREEMPTED)


@app.command("reconstruct")
@reports_errors
def reconstruct_command(
    vae: Annotated[Path, typer.Option("--vae", help="A vae.safetensors file from `ldm train-vae`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Grid to write (.png); -interpolations.png and -prior.png go beside it.")] = Path("reconstructions.png"),
    data: Annotated[Optional[str], typer.Option("--data", help="Images to reconstruct (default: the VAE's held-out split).")] = None,
    num: Annotated[int, typer.Option("--num", "-n", help="How many images.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prior samples.")] = 0,
) -> None:
    """Show inputs beside their reconstructions, with PSNR and SSIM, latent interpolations and prior samples."""
    from ldm_cli.reconstruct import run_reconstruct

    report = run_reconstruct(vae, out, data, num, seed)
    table = Table("image", "PSNR (dB)", "SSIM")
    for i, (p, s) in enumerate(zip(report.psnr, report.ssim)):
        table.add_row(str(i), f"{p:.2f}", f"{s:.4f}")
    table.add_row("mean", f"{report.mean_psnr:.2f}", f"{report.mean_ssim:.4f}", style="bold")
    console.print(table)
    for path in (report.grid, report.interpolations, report.prior_samples):
        console.print(f"wrote {path}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ldm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
