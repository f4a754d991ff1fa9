"""The `ldm` command: one small function per subcommand over functions tests can call.

Errors a user can cause (`ldm_cli.errors.LdmError`) become one line on stderr and the
exit code docs/ARCHITECTURE.md ("Errors and exit codes") gives them: 2 for usage and
configuration, 1 at run time.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from ldm_cli.common.progress import setup_logging
from ldm_cli.config import DenoiserRunConfig, VAERunConfig, load_config, packaged_config
from ldm_cli.diffusion import DEFAULT_STEPS
from ldm_cli.errors import LdmError, UsageError
from ldm_cli.training.rundir import latest_checkpoint

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
ReplaceOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist (refused otherwise).")]
AutoResumeOpt = Annotated[bool, typer.Option("--auto-resume", help="Resume if the output directory holds a checkpoint, else start over (for requeued jobs).")]


def resolve_run(schema, default_name: str, config: Path | None, sets: list[str] | None, updates: dict[str, Any],
                resume: bool, overwrite: bool, auto_resume: bool):
    """The run config and how the run starts: (config, resume, overwrite).

    The config is --config (default: the packaged quickstart one) with --set overrides,
    then the plain flags. On --resume without --config, the run's own config.toml is
    read instead, so a resumed run trains exactly as it began. --auto-resume resumes when
    the output directory holds a checkpoint, and starts over otherwise.
    """
    updates = {k: v for k, v in updates.items() if v is not None}
    cfg = load_config(schema, config or packaged_config(default_name), sets or [], updates)
    run_dir = Path(cfg.output.dir)
    if auto_resume:
        if resume or overwrite:
            raise UsageError("--auto-resume decides between --resume and --overwrite itself; pass only one of them")
        resume = latest_checkpoint(run_dir) is not None
        overwrite = not resume
    saved = run_dir / "config.toml"
    if resume and config is None and saved.is_file():
        cfg = load_config(schema, saved, sets or [], updates)
    return cfg, resume, overwrite


def print_training_result(result, what: str) -> None:
    if not result.is_main_process:  # under `accelerate launch`, one summary for the run
        return
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
    auto_resume: AutoResumeOpt = False,
) -> None:
    """Train a β-VAE (β decays over training) that maps images to a small continuous latent space."""
    from ldm_cli.training.loop import EXIT_PREEMPTED
    from ldm_cli.training.vae_task import train_vae

    cfg, resume, overwrite = resolve_run(VAERunConfig, "quickstart/vae.toml", config, set_, {
        "data.source": data, "output.dir": str(out) if out else None,
        "train.max_steps": max_steps, "train.seed": seed,
    }, resume, overwrite, auto_resume)
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
    overwrite: ReplaceOpt = False,
) -> None:
    """Show inputs beside their reconstructions, with PSNR and SSIM, latent interpolations and prior samples."""
    from ldm_cli.commands.reconstruct import run_reconstruct

    report = run_reconstruct(vae, out, data, num, seed, overwrite)
    table = Table("image", "PSNR (dB)", "SSIM")
    for i, (p, s) in enumerate(zip(report.psnr, report.ssim)):
        table.add_row(str(i), f"{p:.2f}", f"{s:.4f}")
    table.add_row("mean", f"{report.mean_psnr:.2f}", f"{report.mean_ssim:.4f}", style="bold")
    console.print(table)
    for path in (report.grid, report.interpolations, report.prior_samples):
        console.print(f"wrote {path}")


@app.command("schedule-plot")
@reports_errors
def schedule_plot_command(
    timesteps: Annotated[int, typer.Option("--timesteps", "-T", min=1, max=100_000, help="Number of diffusion steps T.")] = 10,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for schedules.png, schedules.csv and noised-latents.png.")] = Path("schedules"),
    schedule: Annotated[Optional[list[str]], typer.Option("--schedule", help="Schedules to compare (repeatable): linear, cosine, sigmoid.")] = None,
    beta_start: Annotated[float, typer.Option("--beta-start", help="Linear schedule's first β.")] = 1e-4,
    beta_end: Annotated[float, typer.Option("--beta-end", help="Linear schedule's last β.")] = 0.02,
    vae: Annotated[Optional[Path], typer.Option("--vae", help="vae.safetensors: also decode a noised latent of --image.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Image to encode, noise at every t and decode.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shared noise ε.")] = 0,
    overwrite: ReplaceOpt = False,
) -> None:
    """Compare noise schedules: β_t and ᾱ_t as plot and table, and a latent noised at each t and decoded."""
    from ldm_cli.commands.schedule_plot import run_schedule_plot

    kinds = schedule or ["linear", "cosine"]
    report = run_schedule_plot(timesteps, out, kinds, beta_start, beta_end, vae, image, seed, overwrite)
    table = Table("t", *[f"{col} {name}" for name in report.schedules for col in ("β_t", "ᾱ_t")])
    tables = [s.table() for s in report.schedules.values()]  # rows of (t, β_t, ᾱ_t)
    for rows in zip(*tables):
        table.add_row(str(rows[0][0]), *[f"{value:.5f}" for _, beta, abar in rows for value in (beta, abar)])
    console.print(table)
    for warning in report.warnings:
        console.print(f"note: {warning}", markup=False)
    for path in (report.plot, report.table, report.noised_grid):
        if path is not None:
            console.print(f"wrote {path}")


@app.command("train-denoiser")
@reports_errors
def train_denoiser_command(
    vae: Annotated[Optional[Path], typer.Option("--vae", help="vae.safetensors whose latents to learn (sets latents.vae).")] = None,
    config: ConfigOpt = None, set_: SetOpt = None, data: DataOpt = None, out: OutOpt = None,
    max_steps: StepsOpt = None, seed: SeedOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
    auto_resume: AutoResumeOpt = False,
) -> None:
    """Train a ConvNeXt U-Net to predict v on the latents of a trained VAE."""
    from ldm_cli.training.denoiser_task import train_denoiser
    from ldm_cli.training.loop import EXIT_PREEMPTED

    cfg, resume, overwrite = resolve_run(DenoiserRunConfig, "quickstart/denoiser.toml", config, set_, {
        "latents.vae": str(vae) if vae else None, "data.source": data,
        "output.dir": str(out) if out else None, "train.max_steps": max_steps, "train.seed": seed,
    }, resume, overwrite, auto_resume)
    result = train_denoiser(cfg, resume=resume, overwrite=overwrite)
    print_training_result(result, "train-denoiser")
    if result.preempted:
        raise typer.Exit(EXIT_PREEMPTED)


CheckpointOpt = Annotated[Path, typer.Option("--checkpoint", "--load", help="A denoiser.safetensors file (it bundles its VAE).")]
ClipOpt = Annotated[Optional[float], typer.Option("--clip-limit", help="Clamp the predicted clean latent to [-c, c] (off by default).")]


@app.command("sample")
@reports_errors
def sample_command(
    checkpoint: CheckpointOpt,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="How many images.")] = 25,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same images.")] = 42,
    clip_limit: ClipOpt = None,
    ddim: Annotated[bool, typer.Option("--ddim", help="Use DDIM (same as --sampler ddim).")] = False,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help="ddpm (all T steps), ddim, or dpm++2m.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help=f"Steps for ddim / dpm++2m (default {DEFAULT_STEPS}); not for ddpm.")] = None,
    eta: Annotated[float, typer.Option("--eta", help="DDIM η: 0 deterministic, 1 DDPM-like.")] = 0.0,
    spacing: Annotated[str, typer.Option("--spacing", help="Timestep spacing for fewer steps: trailing, leading, linspace.")] = "trailing",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images sampled at once (memory does not grow with --num-samples).")] = 25,
    trajectory: Annotated[bool, typer.Option("--trajectory", help="Also draw the reverse process: z_t and ẑ0 at evenly spaced steps.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for grid.png, images/ and trajectory.png.")] = Path("samples"),
    overwrite: ReplaceOpt = False,
) -> None:
    """Generate images with DDPM (stochastic, every step), DDIM (deterministic, few steps) or DPM-Solver++."""
    from ldm_cli.commands.sample import run_sample

    if ddim and sampler not in (None, "ddim"):
        raise typer.BadParameter(f"--ddim contradicts --sampler {sampler}")
    chosen = "ddim" if ddim else (sampler or "ddpm")
    report = run_sample(checkpoint, out, num_samples=num_samples, seed=seed, sampler=chosen, steps=steps, eta=eta,
                        clip_limit=clip_limit, batch_size=batch_size, trajectory=trajectory, spacing=spacing,
                        overwrite=overwrite)
    console.print(f"{len(report.images)} images with {chosen} ({report.timesteps_used} steps) in {report.seconds:.1f} s")
    console.print(f"wrote {report.grid} and {report.out_dir / 'images'}/")
    if report.trajectory:
        console.print(f"wrote {report.trajectory}")


@app.command("reimagine")
@reports_errors
def reimagine_command(
    checkpoint: CheckpointOpt,
    image: Annotated[Path, typer.Option("--image", help="The image to reimagine.")],
    strength: Annotated[Optional[list[float]], typer.Option("--strength", help="Noise to t = strength·T, in (0, 1] (repeatable).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps for strength 1 (scaled by strength).")] = DEFAULT_STEPS,
    seed: Annotated[int, typer.Option("--seed", help="First seed.")] = 0,
    num_seeds: Annotated[int, typer.Option("--num-seeds", help="Seeds seed, seed+1, …: DDPM varies, DDIM stays.")] = 1,
    clip_limit: ClipOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for reimagine.png and reimagine-trajectory.png.")] = Path("reimagined"),
    overwrite: ReplaceOpt = False,
) -> None:
    """Partly noise an image's latent and let DDPM and DDIM reimagine it, side by side."""
    from ldm_cli.commands.reimagine import run_reimagine

    strengths = strength or [0.25, 0.5, 0.75, 1.0]
    report = run_reimagine(checkpoint, image, out, strengths=strengths, steps=steps, seed=seed,
                           num_seeds=num_seeds, clip_limit=clip_limit, overwrite=overwrite)
    for s in strengths:
        console.print(f"strength {s}: t = {report.start_timesteps[s]}, DDPM {report.start_timesteps[s] + 1} steps, "
                      f"DDIM {report.ddim_steps[s]} steps")
    console.print(f"wrote {report.grid} and {report.trajectory}")


@app.command("demo")
@reports_errors
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every stage's outputs and report.md / report.html.")] = Path("demo"),
    minutes: Annotated[float, typer.Option("--minutes", help="Training budget on a 2-core CPU; scales the quickstart configs' steps.")] = 10.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of sampling and reimagining.")] = 0,
) -> None:
    """Run the whole workflow on builtin:faces and write a report with every figure."""
    from ldm_cli.commands.demo import run_demo

    result = run_demo(out, minutes, seed)
    table = Table("stage", "seconds", "")
    for name, record in result.records.items():
        table.add_row(name, f"{record['seconds']:.1f}", "reused" if record.get("reused") else "")
    console.print(table)
    console.print(f"wrote {result.report_md} and {result.report_html}")


@app.command("evaluate")
@reports_errors
def evaluate_command(
    samples: Annotated[Path, typer.Option("--samples", help="Generated images: an `ldm sample` output folder (its images/ is used) or any folder of images.")],
    reference: Annotated[str, typer.Option("--reference", help="Reference images: an image folder, a .zip of images, or builtin:faces (prepared at the samples' resolution).")],
    inception_weights: Annotated[Optional[Path], typer.Option("--inception-weights", help="Local torchvision Inception v3 weights (inception_v3_google-0cc3c7bd.pth or .safetensors). Default: $TORCH_HOME/hub/checkpoints/ (TORCH_HOME defaults to ~/.cache/torch). Never downloaded.")] = None,
    features: Annotated[Optional[Path], typer.Option("--features", help="TorchScript feature network instead of Inception: float images in [0, 1] of shape (N, 3, S, S) → features (N, D).")] = None,
    features_size: Annotated[Optional[int], typer.Option("--features-size", help="Side S images are resized to for --features (default: the samples' own size).")] = None,
    num_reference: Annotated[Optional[int], typer.Option("--num-reference", help="Use this many reference images (a fixed random subset; builtin:faces draws this many). Default: all.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pass of the feature network (memory does not grow with the number of images).")] = 50,
) -> None:
    """Score generated images against a data set: FID, KID and precision/recall in a feature network's space."""
    from ldm_cli.commands.evaluate import format_report, run_evaluate

    report = run_evaluate(samples, reference, inception_weights=inception_weights, features=features,
                          features_size=features_size, batch_size=batch_size, num_reference=num_reference)
    for line in format_report(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ldm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
