"""The `ldm` command: one small function per subcommand over functions tests can call.

Errors a user can cause (`ldm_cli.errors.LdmError`), and the usage errors the option
parser finds, become one line `ldm: error: …` on stderr and the exit code
docs/ARCHITECTURE.md ("Errors and exit codes") gives them: 2 for usage and
configuration, 1 at run time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ldm_cli import __version__
from ldm_cli.cli_support import (
    EXIT_INTERRUPTED,
    SCHEDULE_TABLE_ROWS,
    SEED_DEFAULT,
    LdmGroup,
    console,
    err_console,
    reports_errors,
)
from ldm_cli.config import SEED_MAX, DenoiserRunConfig, VAERunConfig
from ldm_cli.diffusion import DEFAULT_STEPS
from ldm_cli.errors import UsageError

app = typer.Typer(
    name="ldm",
    cls=LdmGroup,
    help="Latent diffusion toolkit: train a β-VAE and a v-prediction ConvNeXt U-Net, then sample with DDPM/DDIM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def show_version(value: bool) -> None:
    if value:
        console.print(f"ldm {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Latent diffusion toolkit: train a β-VAE and a v-prediction ConvNeXt U-Net, then sample with DDPM/DDIM."""


# --------------------------------------------------------------------------- shared options

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file; a configs/… path not found here is taken from the packaged configs.", show_default="the packaged quickstart config")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable; 'none' turns an optional setting off).")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Image folder, .zip of images, or builtin:faces (sets data.source).", show_default="the config's data.source")]
StepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer updates (sets train.max_steps).", show_default="the config's train.max_steps")]
TrainSeedOpt = Annotated[Optional[int], typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed (sets train.seed).", show_default="the config's train.seed")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed: the same seed gives the same result.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in the output directory from its newest checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start over in an output directory that already holds a run.")]
ReplaceOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist (refused otherwise).")]
AutoResumeOpt = Annotated[bool, typer.Option("--auto-resume", help="Resume if the output directory holds a checkpoint, else start over (for requeued jobs).")]


def run_out_option(default: str) -> Any:
    return Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (sets output.dir).", show_default=default)]


def print_training_result(result, what: str, out: Path) -> None:
    """One summary line for the run (main process only), then exit as the run ended."""
    from ldm_cli.training.loop import EXIT_PREEMPTED

    if not result.is_main_process:  # under `accelerate launch`, one summary for the run
        return
    state = f"stopped by {result.stop_signal} at" if result.preempted else "finished at"
    console.print(
        f"{what} {state} step {result.final_step}: {result.steps_done} updates in {result.seconds:.1f} s "
        f"({result.steps_per_second:.2f} steps/s, {result.world_size} process(es))"
        + (f"; {result.skipped_nonfinite} non-finite updates skipped" if result.skipped_nonfinite else "")
    )
    if result.export_path is not None:
        console.print(f"exported {result.export_path}")
    if result.preempted:
        console.print(f"resume with: ldm {what} --out {out} --resume")
        raise typer.Exit(EXIT_INTERRUPTED if result.stop_signal == "SIGINT" else EXIT_PREEMPTED)


# --------------------------------------------------------------------------- commands


@app.command("train-vae")
@reports_errors
def train_vae_command(
    config: ConfigOpt = None, set_: SetOpt = None, data: DataOpt = None, out: run_out_option("runs/vae") = None,
    max_steps: StepsOpt = None, seed: TrainSeedOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
    auto_resume: AutoResumeOpt = False,
) -> None:
    """Train a β-VAE (β decays over training) that maps images to a small continuous latent space."""
    from ldm_cli.training.start import resolve_run
    from ldm_cli.training.vae_task import train_vae

    cfg, resume, overwrite = resolve_run(VAERunConfig, config, set_, {
        "data.source": data, "output.dir": str(out) if out else None,
        "train.max_steps": max_steps, "train.seed": seed,
    }, resume, overwrite, auto_resume)
    result = train_vae(cfg, resume=resume, overwrite=overwrite)
    print_training_result(result, "train-vae", Path(cfg.output.dir))


@app.command("reconstruct")
@reports_errors
def reconstruct_command(
    vae: Annotated[Optional[Path], typer.Option("--vae", help="A vae.safetensors file from `ldm train-vae`.", show_default="runs/vae/vae.safetensors")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for reconstructions.png, interpolations.png and prior.png.")] = Path("reconstructions"),
    data: Annotated[Optional[str], typer.Option("--data", help="Images to reconstruct.", show_default="the VAE's held-out split")] = None,
    num: Annotated[int, typer.Option("--num", "-n", min=1, help="How many images.")] = 5,
    seed: SeedOpt = SEED_DEFAULT,
    overwrite: ReplaceOpt = False,
) -> None:
    """Show inputs beside their reconstructions, with PSNR and SSIM, latent interpolations and prior samples."""
    from ldm_cli.commands.reconstruct import run_reconstruct
    from ldm_cli.training.start import model_file

    report = run_reconstruct(model_file(vae, "vae", "--vae"), out, data, num, seed, overwrite)
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
    schedule: Annotated[Optional[list[str]], typer.Option("--schedule", help="Schedules to compare (repeatable): linear, cosine, sigmoid.", show_default="linear and cosine")] = None,
    beta_start: Annotated[float, typer.Option("--beta-start", help="Linear schedule's first β.")] = 1e-4,
    beta_end: Annotated[float, typer.Option("--beta-end", help="Linear schedule's last β.")] = 0.02,
    vae: Annotated[Optional[Path], typer.Option("--vae", help="vae.safetensors: also decode a noised latent of --image.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Image to encode, noise at every t and decode.")] = None,
    seed: SeedOpt = SEED_DEFAULT,
    overwrite: ReplaceOpt = False,
) -> None:
    """Compare noise schedules: β_t and ᾱ_t as plot and table, and a latent noised at each t and decoded."""
    from ldm_cli.commands.schedule_plot import run_schedule_plot, shown_timesteps

    kinds = schedule or ["linear", "cosine"]
    report = run_schedule_plot(timesteps, out, kinds, beta_start, beta_end, vae, image, seed, overwrite)
    table = Table("t", *[f"{col} {name}" for name in report.schedules for col in ("β_t", "ᾱ_t")])
    tables = [s.table() for s in report.schedules.values()]  # rows of (t, β_t, ᾱ_t)
    for t in shown_timesteps(timesteps, SCHEDULE_TABLE_ROWS):
        table.add_row(str(t), *[f"{value:.5f}" for rows in tables for value in rows[t][1:]])
    console.print(table)
    if timesteps > SCHEDULE_TABLE_ROWS:
        console.print(f"{SCHEDULE_TABLE_ROWS} of {timesteps} timesteps shown; {report.table} has them all")
    for warning in report.warnings:
        console.print(f"warning: {warning}", markup=False)
    for path in (report.plot, report.table, report.noised_grid):
        if path is not None:
            console.print(f"wrote {path}")


@app.command("train-denoiser")
@reports_errors
def train_denoiser_command(
    vae: Annotated[Optional[Path], typer.Option("--vae", help="vae.safetensors whose latents to learn (sets latents.vae).", show_default="the config's latents.vae, else runs/vae/vae.safetensors")] = None,
    config: ConfigOpt = None, set_: SetOpt = None, data: DataOpt = None, out: run_out_option("runs/denoiser") = None,
    max_steps: StepsOpt = None, seed: TrainSeedOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
    auto_resume: AutoResumeOpt = False,
) -> None:
    """Train a ConvNeXt U-Net to predict v on the latents of a trained VAE."""
    from ldm_cli.training.denoiser_task import train_denoiser
    from ldm_cli.training.start import model_file, resolve_run

    cfg, resume, overwrite = resolve_run(DenoiserRunConfig, config, set_, {
        "latents.vae": str(vae) if vae else None, "data.source": data,
        "output.dir": str(out) if out else None, "train.max_steps": max_steps, "train.seed": seed,
    }, resume, overwrite, auto_resume)
    if cfg.latents.vae is None:
        cfg.latents.vae = str(model_file(None, "vae", "--vae"))
    result = train_denoiser(cfg, resume=resume, overwrite=overwrite)
    print_training_result(result, "train-denoiser", Path(cfg.output.dir))


CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", "--load", help="A denoiser.safetensors file (it bundles its VAE).", show_default="runs/denoiser/denoiser.safetensors")]
ClipOpt = Annotated[Optional[float], typer.Option("--clip-limit", help="Clamp the predicted clean latent to [-c, c].", show_default="off")]


@app.command("sample")
@reports_errors
def sample_command(
    checkpoint: CheckpointOpt = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, help="How many images.")] = 25,
    seed: SeedOpt = SEED_DEFAULT,
    clip_limit: ClipOpt = None,
    ddim: Annotated[bool, typer.Option("--ddim", help="Use DDIM (same as --sampler ddim).")] = False,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help="ddpm (all T steps), ddim, or dpm++2m.", show_default="ddpm, or ddim with --ddim")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Steps for ddim / dpm++2m; not for ddpm.", show_default=f"{DEFAULT_STEPS}, at most T")] = None,
    eta: Annotated[float, typer.Option("--eta", help="DDIM η: 0 deterministic, 1 DDPM-like.")] = 0.0,
    spacing: Annotated[str, typer.Option("--spacing", help="Timestep spacing for fewer steps: trailing, leading, linspace.")] = "trailing",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images sampled at once (memory does not grow with --num-samples).")] = 25,
    trajectory: Annotated[bool, typer.Option("--trajectory", help="Also draw the reverse process: z_t and ẑ0 at evenly spaced steps (trajectory.png, and trajectory.gif as an animation).")] = False,
    precision: Annotated[str, typer.Option("--precision", help="Model calls in fp32 or bf16; auto: bf16 where the device runs it natively (CUDA GPUs with bf16, CPUs with AVX512-BF16/AMX).")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="Compile the network first (torch.compile, weights frozen): faster steps after a one-time compilation of about 10 s on a CPU, worth it from a few thousand images.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for grid.png, images/, trajectory.png and trajectory.gif.")] = Path("samples"),
    overwrite: ReplaceOpt = False,
) -> None:
    """Generate images with DDPM (stochastic, every step), DDIM (deterministic, few steps) or DPM-Solver++."""
    from ldm_cli.commands.sample import run_sample
    from ldm_cli.training.start import model_file

    if ddim and sampler not in (None, "ddim"):
        raise UsageError(f"--ddim contradicts --sampler {sampler}: pass one of them")
    chosen = "ddim" if ddim else (sampler or "ddpm")
    report = run_sample(model_file(checkpoint, "denoiser", "--checkpoint"), out, num_samples=num_samples, seed=seed,
                        sampler=chosen, steps=steps, eta=eta, clip_limit=clip_limit, batch_size=batch_size,
                        trajectory=trajectory, spacing=spacing, overwrite=overwrite, precision=precision,
                        compile=compile)
    console.print(f"{len(report.images)} images with {chosen} ({report.timesteps_used} steps) in {report.seconds:.1f} s")
    console.print(f"wrote {report.grid} and {report.out_dir / 'images'}/")
    for picture in (report.trajectory, report.trajectory_gif):
        if picture is not None:
            console.print(f"wrote {picture}")


@app.command("reimagine")
@reports_errors
def reimagine_command(
    image: Annotated[Path, typer.Option("--image", help="The image to reimagine.")],
    checkpoint: CheckpointOpt = None,
    strength: Annotated[Optional[list[float]], typer.Option("--strength", help="Noise to t = strength·T, in (0, 1] (repeatable).", show_default="0.25, 0.5, 0.75 and 1")] = None,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps for strength 1 (scaled by strength).")] = DEFAULT_STEPS,
    seed: SeedOpt = SEED_DEFAULT,
    num_seeds: Annotated[int, typer.Option("--num-seeds", min=1, help="Seeds seed, seed+1, …: DDPM varies, DDIM stays.")] = 1,
    clip_limit: ClipOpt = None,
    invert: Annotated[bool, typer.Option("--invert", help="Reach t by deterministic DDIM inversion instead of fresh noise: DDIM then gives the input back.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for reimagine.png and reimagine-trajectory.png.")] = Path("reimagined"),
    overwrite: ReplaceOpt = False,
) -> None:
    """Partly noise an image's latent and let DDPM and DDIM reimagine it, side by side."""
    from ldm_cli.commands.reimagine import DEFAULT_STRENGTHS, run_reimagine
    from ldm_cli.training.start import model_file

    strengths = strength or list(DEFAULT_STRENGTHS)
    report = run_reimagine(model_file(checkpoint, "denoiser", "--checkpoint"), image, out, strengths=strengths,
                           steps=steps, seed=seed, num_seeds=num_seeds, clip_limit=clip_limit, overwrite=overwrite,
                           invert=invert)
    for s in strengths:
        console.print(f"strength {s}: t = {report.start_timesteps[s]}, DDPM {report.start_timesteps[s] + 1} steps, "
                      f"DDIM {report.ddim_steps[s]} steps")
    console.print(f"wrote {report.grid} and {report.trajectory}")


@app.command("demo")
@reports_errors
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every stage's outputs and report.md / report.html.")] = Path("demo"),
    minutes: Annotated[float, typer.Option("--minutes", help="Wall-clock minutes for the whole demo on this machine: a few timed updates of each model size the quickstart configs' training to 2/3 of them (kept in OUT/budget.json for reruns).")] = 10.0,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed of both trainings and of sampling: another seed is an independent run.")] = SEED_DEFAULT,
) -> None:
    """Run the whole workflow on builtin:faces and write a report with every figure."""
    from ldm_cli.commands.demo import run_demo, stage_table

    result = run_demo(out, minutes, seed)
    header, rows = stage_table(result.records)
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {result.report_md} and {result.report_html}")


@app.command("evaluate")
@reports_errors
def evaluate_command(
    samples: Annotated[Path, typer.Option("--samples", help="Generated images: an `ldm sample` output folder (its images/ is used) or any folder of images.")],
    reference: Annotated[str, typer.Option("--reference", help="Reference images: an image folder, a .zip of images, or builtin:faces (prepared at the samples' resolution). builtin:faces is scored with the packaged face-attribute network, beside three references, unless a feature-network option is given.")],
    inception_weights: Annotated[Optional[Path], typer.Option("--inception-weights", help="Local torchvision Inception v3 weights (inception_v3_google-0cc3c7bd.pth or .safetensors). Default: $TORCH_HOME/hub/checkpoints/ (TORCH_HOME defaults to ~/.cache/torch). Never downloaded; not needed for builtin:faces.")] = None,
    features: Annotated[Optional[Path], typer.Option("--features", help="TorchScript feature network instead of Inception: float images in [0, 1] of shape (N, 3, S, S) → features (N, D).")] = None,
    features_size: Annotated[Optional[int], typer.Option("--features-size", min=1, help="Side S images are resized to for --features.", show_default="the samples' own size")] = None,
    num_reference: Annotated[Optional[int], typer.Option("--num-reference", help="Use this many reference images (a fixed random subset). With the face-attribute network: at most this many of builtin:faces' training faces; else builtin:faces draws this many.", show_default="all")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per pass of the feature network (memory does not grow with the number of images).")] = 50,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Denoiser file (it bundles its VAE) for the VAE-recon and prior references of the builtin:faces scores.", show_default="the checkpoint the samples folder's sample.json names, else runs/denoiser/denoiser.safetensors if it exists")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write every number (each set's scores, per-head attribute KL, counts, the network's identity) as JSON to this file.")] = None,
    overwrite: ReplaceOpt = False,
) -> None:
    """Score generated images against a data set: FID/FD, KID and precision/recall (and, on builtin:faces, legibility and attribute KL beside three references)."""
    from ldm_cli.commands.evaluate import format_report, run_evaluate

    report = run_evaluate(samples, reference, inception_weights=inception_weights, features=features,
                          features_size=features_size, batch_size=batch_size, num_reference=num_reference,
                          checkpoint=checkpoint, json_path=json_path, overwrite=overwrite)
    for line in format_report(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("study")
@reports_errors
def study_command(
    checkpoint: CheckpointOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for study.md, study.html, study.json and the plots.")] = Path("study"),
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=4, help="Samples per sampler setting.")] = 256,
    seed: SeedOpt = SEED_DEFAULT,
    image: Annotated[Optional[Path], typer.Option("--image", help="The face to reimagine.", show_default="the first held-out builtin:faces face")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A few settings of each question only (a fast look).")] = False,
    schedules: Annotated[bool, typer.Option("--schedules", help="Also retrain the denoiser's run with the linear, cosine and sigmoid schedules and compare FD against updates (three trainings).")] = False,
    schedule_updates: Annotated[Optional[int], typer.Option("--schedule-updates", help="Updates of each --schedules run.", show_default="the run's own train.max_steps")] = None,
    overwrite: ReplaceOpt = False,
) -> None:
    """Answer the sheet's questions for one denoiser: quality against steps and samplers, DDPM vs DDIM diversity, clip limit, what DDIM inversion buys, and (--schedules) the noise schedule."""
    from ldm_cli.commands.study import run_study
    from ldm_cli.training.start import model_file

    report = run_study(model_file(checkpoint, "denoiser", "--checkpoint"), out, num_samples=num_samples, seed=seed,
                       image=image, quick=quick, overwrite=overwrite, schedules=schedules,
                       schedule_updates=schedule_updates)
    console.print(f"wrote {report.markdown}, {report.html} and {report.json_path}")


@app.command("cache")
@reports_errors
def cache_command(
    list_: Annotated[bool, typer.Option("--list", help="List the image caches: source, size, last use.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Remove caches not used for --older-than days, and leftovers of killed writes.")] = False,
    older_than: Annotated[float, typer.Option("--older-than", min=0.0, help="With --prune: days since a cache was last used.")] = 30.0,
    all_: Annotated[bool, typer.Option("--all", help="With --prune: remove every cache.")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="The cache folder.", show_default="$LDM_CACHE_DIR, else ~/.cache/ldm")] = None,
) -> None:
    """List or prune the image caches that data preparation keeps (rebuilt when needed)."""
    from ldm_cli.commands.cache import format_entries, list_caches, prune_caches
    from ldm_cli.config import DataConfig
    from ldm_cli.data.cache import cache_dir_for

    folder = cache_dir or cache_dir_for(DataConfig())
    if list_ == prune:
        raise UsageError("pass --list or --prune")
    if list_:
        for line in format_entries(list_caches(folder)) or [f"no caches in {folder}"]:
            console.print(line, markup=False, highlight=False)
        return
    removed = prune_caches(folder, older_than_days=None if all_ else older_than, all=all_)
    console.print(f"removed {len(removed)} file(s) from {folder}")


def main() -> None:
    """Console-script entry point. A Ctrl-C that lands outside a command (a second one
    while the first is being handled) still ends in one line and exit code 130."""
    try:
        app(prog_name="ldm")
    except KeyboardInterrupt:
        err_console.print("ldm: interrupted", markup=False)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
