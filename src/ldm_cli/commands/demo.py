"""`ldm demo`: the whole workflow on `builtin:faces`, one folder, one report.

Stages, each through the same function its own command uses:

    train-vae → reconstruct → schedule-plot → train-denoiser → sample (DDPM) → sample (DDIM)
    → evaluate (FD, legibility of DDIM-50 samples beside the three references) → reimagine
    → report.md / report.html

`--minutes` is wall clock on this machine: before training, a few timed updates of each
model (`training.budget`) size the packaged quickstart configs' steps, scaled by one
factor, so that the training updates take TRAINING_SHARE of the minutes and the other
stages the rest. `budget.json` keeps that sizing, so a rerun with the same `--minutes`
trains the same number of updates. A stage whose outputs are already in the folder is
reused when the command runs again; an interrupted training stage resumes from its newest
checkpoint. `stages.json` keeps each stage's wall time and results (for a training stage,
the `--minutes` it ran with, which the report shows).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ldm_cli.commands.evaluate import run_evaluate
from ldm_cli.commands.reconstruct import run_reconstruct
from ldm_cli.commands.reimagine import run_reimagine
from ldm_cli.commands.report import Report
from ldm_cli.commands.sample import run_sample
from ldm_cli.commands.schedule_plot import run_schedule_plot
from ldm_cli.common.device import default_device
from ldm_cli.common.files import atomic_write
from ldm_cli.common.progress import logger
from ldm_cli.config import DenoiserRunConfig, RunConfigT, VAERunConfig, load_config, packaged_config
from ldm_cli.data.prepare import load_images
from ldm_cli.errors import UsageError
from ldm_cli.training.budget import Calibration, seconds_per_update
from ldm_cli.training.denoiser_task import train_denoiser
from ldm_cli.training.rundir import latest_checkpoint
from ldm_cli.training.vae_task import train_vae

DEFAULT_MINUTES = 10.0
# The share of `--minutes` that the timed updates fill. The rest goes to what the timing leaves
# out: the training loop's own cost per update (1.12–1.24× the timed step), the stages' fixed
# costs (drawing the faces, the latent cache, exports), the denoiser's quality measurements,
# and the sampling, evaluation and figures. On a 2-core AVX2 CPU a 10-minute demo took
# 10 min 44 s with 3/4 and 8 min 56 s with 2/3 (benchmarks/README.md, ninth study).
TRAINING_SHARE = 2 / 3
STRENGTHS = [0.25, 0.5, 0.75, 1.0]
NUM_SAMPLES = 16
EVAL_SAMPLES = 500  # DDIM-50 samples scored by the evaluate stage, as benchmarks/quality_budget.py scores them
EVAL_BATCH = 250
SCHEDULE_T = 10


# --------------------------------------------------------------------------- budgets


def _budget_updates(max_steps: int, warmup: int, run_dir: Path) -> dict[str, Any]:
    return {
        "train.max_steps": max_steps,
        "optim.warmup_steps": min(warmup, max_steps // 10),
        "logging.checkpoint_every": max(1, max_steps // 4),
        "logging.preview_every": max(1, max_steps // 4),
        "logging.log_every": max(1, max_steps // 20),
        "output.dir": str(run_dir),
    }


def budget_config(schema: type[RunConfigT], path: Path, overrides: list[str], factor: float, run_dir: Path,
                  extra: dict[str, Any] | None = None) -> RunConfigT:
    """`path` plus overrides with its updates scaled by `factor` (at least 50), its warm-up
    capped at a tenth of them and, for a VAE, its β decay scaled alike; written to `run_dir`."""
    base = load_config(schema, path, overrides)
    steps = max(50, round(base.train.max_steps * factor))
    updates = _budget_updates(steps, base.optim.warmup_steps, run_dir)
    if isinstance(base, VAERunConfig):
        updates["loss.beta_decay_steps"] = round(base.loss.beta_decay_steps * steps / base.train.max_steps)
    return load_config(schema, path, overrides, {**updates, **(extra or {})})


def demo_vae_config(folder: Path, scale: float, overrides: list[str] = (), seed: int = 0) -> VAERunConfig:
    """The quickstart VAE config (plus `--set`-style overrides) with its updates × `scale`,
    trained from `seed`."""
    return budget_config(VAERunConfig, packaged_config("quickstart/vae.toml"), list(overrides),
                         scale, folder / "vae", {"train.seed": seed})


def demo_denoiser_config(folder: Path, scale: float, overrides: list[str] = (), seed: int = 0) -> DenoiserRunConfig:
    """The quickstart denoiser config (plus overrides) with its updates × `scale`, on the demo's
    VAE, trained from `seed`."""
    return budget_config(DenoiserRunConfig, packaged_config("quickstart/denoiser.toml"), list(overrides),
                         scale, folder / "denoiser",
                         {"latents.vae": str(folder / "vae" / "vae.safetensors"), "train.seed": seed})


@dataclass(frozen=True)
class DemoBudget:
    """How long the demo trains: `minutes` of wall clock, spent as the quickstart configs'
    updates × `scale`; the seconds per update timed to choose it (None when it was given)."""

    minutes: float
    scale: float
    vae_update_seconds: float | None = None
    den_update_seconds: float | None = None


def sized_scale(minutes: float, vae_update_seconds: float, den_update_seconds: float, vae_steps: int,
                den_steps: int) -> float:
    """The factor s of both configs' steps with s · (N_vae · t_vae + N_den · t_den) equal to
    TRAINING_SHARE of `minutes`."""
    timing = Calibration(vae_update_seconds, 0.0, den_update_seconds, 0.0, vae_steps, den_steps)
    return timing.factors(TRAINING_SHARE * minutes * 60)[0]


def measure_budget(minutes: float, vae_overrides: list[str] = (), denoiser_overrides: list[str] = ()) -> DemoBudget:
    """Time a few updates of each quickstart model on this machine and size the demo's training
    to `minutes` of wall clock."""
    folder = Path("unused")  # the configs are only built, not written
    vae_cfg, den_cfg = demo_vae_config(folder, 1.0, vae_overrides), demo_denoiser_config(folder, 1.0, denoiser_overrides)
    device = default_device()
    vae_s, den_s = seconds_per_update(vae_cfg, device), seconds_per_update(den_cfg, device)
    scale = sized_scale(minutes, vae_s, den_s, vae_cfg.train.max_steps, den_cfg.train.max_steps)
    logger.info(f"demo: one update takes {vae_s * 1000:.0f} ms (VAE) and {den_s * 1000:.0f} ms (denoiser) here, so "
                f"{minutes:g} minutes train {round(vae_cfg.train.max_steps * scale)} and "
                f"{round(den_cfg.train.max_steps * scale)} updates")
    return DemoBudget(minutes, scale, vae_s, den_s)


def read_budget(path: Path) -> DemoBudget | None:
    """The sizing an earlier run of the demo in this folder wrote, if any and readable."""
    try:
        budget = DemoBudget(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    numbers = (budget.minutes, budget.scale, budget.vae_update_seconds, budget.den_update_seconds)
    if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in numbers):
        return None
    return budget


def demo_budget(folder: Path, minutes: float, vae_overrides: list[str] = (),
                denoiser_overrides: list[str] = ()) -> DemoBudget:
    """The sizing of an earlier run with the same `minutes` (so a rerun trains the same
    updates), else a new one, kept in FOLDER/budget.json."""
    path = folder / "budget.json"
    earlier = read_budget(path)
    if earlier is not None and earlier.minutes == minutes:
        return earlier
    budget = measure_budget(minutes, vae_overrides, denoiser_overrides)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(asdict(budget), indent=2))
    return budget


# --------------------------------------------------------------------------- stages


@dataclass
class DemoStage:
    name: str
    outputs: list[Path]  # the stage is done when all of these exist
    run: Callable[[], dict[str, Any]]  # returns the results the report shows


def _read_records(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_records(path: Path, records: dict[str, dict[str, Any]]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(records, indent=2))


def run_stages(stages: list[DemoStage], records_path: Path) -> dict[str, dict[str, Any]]:
    """Run each stage not done yet, timing it; keep the records of reused ones."""
    records = _read_records(records_path)
    for stage in stages:
        if all(p.exists() for p in stage.outputs) and stage.name in records:
            records[stage.name]["reused"] = True
            logger.info(f"demo: {stage.name} already done, reused")
            continue
        logger.info(f"demo: {stage.name} …")
        started = time.perf_counter()
        results = stage.run()
        records[stage.name] = {"seconds": time.perf_counter() - started, "reused": False, **results}
        _write_records(records_path, records)
    return records


def _save_demo_face(cfg: VAERunConfig, path: Path) -> Path:
    """A held-out face (never trained on) as the image for schedule-plot and reimagine."""
    images = load_images(cfg.data)
    pixels = images.holdout[0].permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def sample_outputs(folder: Path, sampler: str) -> list[Path]:
    """What a sampling stage leaves for the report: the grid and the animated trajectory."""
    return [folder / f"samples-{sampler}" / "grid.png", folder / f"samples-{sampler}" / "trajectory.gif"]


def demo_stages(folder: Path, budget: DemoBudget, seed: int, vae_overrides: list[str] = (),
                denoiser_overrides: list[str] = ()) -> list[DemoStage]:
    vae_cfg = demo_vae_config(folder, budget.scale, vae_overrides, seed)
    den_cfg = demo_denoiser_config(folder, budget.scale, denoiser_overrides, seed)
    vae_file = folder / "vae" / "vae.safetensors"
    den_file = folder / "denoiser" / "denoiser.safetensors"
    face = folder / "face.png"

    def train_stage(train_fn, cfg) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            resume = latest_checkpoint(Path(cfg.output.dir)) is not None
            result = train_fn(cfg, resume=resume, overwrite=not resume)
            return {"steps": result.final_step, "steps_per_second": result.steps_per_second,
                    "minutes": budget.minutes, "scale": budget.scale}
        return run

    def reconstruct() -> dict[str, Any]:
        report = run_reconstruct(vae_file, folder / "reconstruct", num=8, overwrite=True)
        return {"psnr": report.psnr, "ssim": report.ssim, "mean_psnr": report.mean_psnr, "mean_ssim": report.mean_ssim}

    def schedules() -> dict[str, Any]:
        _save_demo_face(vae_cfg, face)
        report = run_schedule_plot(SCHEDULE_T, folder / "schedules", ["linear", "cosine"], vae_path=vae_file,
                                   image_path=face, seed=seed, overwrite=True)
        return {"warnings": report.warnings}

    def sample(sampler: str, steps: int | None) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            report = run_sample(den_file, folder / f"samples-{sampler}", num_samples=NUM_SAMPLES, seed=seed,
                                sampler=sampler, steps=steps, batch_size=NUM_SAMPLES, trajectory=True,
                                overwrite=True)
            return {"steps": report.timesteps_used, "sampling_seconds": report.seconds}
        return run

    def evaluate() -> dict[str, Any]:
        samples = folder / "evaluate" / "samples"
        run_sample(den_file, samples, num_samples=EVAL_SAMPLES, seed=seed, sampler="ddim", steps=50,
                   batch_size=EVAL_BATCH, overwrite=True)
        report = run_evaluate(samples / "images", "builtin:faces", checkpoint=den_file, batch_size=EVAL_BATCH,
                              json_path=folder / "evaluate" / "evaluate.json", overwrite=True)
        return {"scores": {name: s.to_dict() if s is not None else None for name, s in report.scores.items()}}

    def reimagine() -> dict[str, Any]:
        report = run_reimagine(den_file, face, folder / "reimagine", strengths=STRENGTHS, steps=50, seed=seed,
                               num_seeds=2, overwrite=True)
        return {"start_timesteps": {str(k): v for k, v in report.start_timesteps.items()},
                "ddim_steps": {str(k): v for k, v in report.ddim_steps.items()}}

    return [
        DemoStage("train-vae", [vae_file], train_stage(train_vae, vae_cfg)),
        DemoStage("reconstruct", [folder / "reconstruct" / "reconstructions.png"], reconstruct),
        DemoStage("schedule-plot", [folder / "schedules" / "noised-latents.png", face], schedules),
        DemoStage("train-denoiser", [den_file], train_stage(train_denoiser, den_cfg)),
        DemoStage("sample-ddpm", sample_outputs(folder, "ddpm"), sample("ddpm", None)),
        DemoStage("sample-ddim", sample_outputs(folder, "ddim"), sample("ddim", 50)),
        DemoStage("evaluate", [folder / "evaluate" / "evaluate.json"], evaluate),
        DemoStage("reimagine", [folder / "reimagine" / "reimagine.png"], reimagine),
    ]


# --------------------------------------------------------------------------- report


TRAINING_STAGES = ("train-vae", "train-denoiser")


def budget_text(records: dict[str, dict[str, Any]], minutes: float) -> str:
    """The training budget the models were trained with: the `--minutes` each training stage
    ran with (stages.json), which differs from this run's when they were reused from another run."""
    ran = {name: records[name].get("minutes") for name in TRAINING_STAGES}
    if all(m == minutes for m in ran.values()):
        return f"Training budget --minutes {minutes:g}."

    def how(name: str, ran_with: float | None) -> str:
        budget = f"ran with --minutes {ran_with:g}" if ran_with is not None else "ran with a budget not recorded"
        return f"{name} {budget}" + (" (reused from an earlier run)" if records[name].get("reused") else "")

    return (f"Training budgets differ from this run's --minutes {minutes:g}: "
            + ", ".join(how(name, m) for name, m in ran.items()) + ".")


def stage_table(records: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the wall-time table: each stage's seconds, and whether it was reused."""
    rows = [[name, f"{rec['seconds']:.1f}", "yes" if rec.get("reused") else "no"] for name, rec in records.items()]
    total = sum(rec["seconds"] for rec in records.values())
    return ["stage", "seconds", "reused"], rows + [["total", f"{total:.1f}", ""]]


def sizing_text(records: dict[str, dict[str, Any]], budget: DemoBudget) -> str:
    """How `budget` was sized on this machine, when both training stages ran with it."""
    if budget.vae_update_seconds is None or any(records[n].get("scale") != budget.scale for n in TRAINING_STAGES):
        return ""
    return (f" One update took {budget.vae_update_seconds * 1000:.0f} ms (VAE) and "
            f"{budget.den_update_seconds * 1000:.0f} ms (denoiser) on this machine, so the quickstart configs' "
            f"updates were scaled by {budget.scale:.3f} to give training {TRAINING_SHARE:.0%} of the minutes.")


def build_report(folder: Path, records: dict[str, dict[str, Any]], budget: DemoBudget) -> Report:
    r = Report("ldm demo: latent diffusion on builtin:faces", folder)
    r.text(f"{budget_text(records, budget.minutes)}{sizing_text(records, budget)} Every figure below was produced "
           "by the same functions as the individual ldm commands.")
    r.heading("Wall time of each stage")
    r.table(*stage_table(records))

    vae, den = records["train-vae"], records["train-denoiser"]
    r.heading("1. β-VAE")
    r.text(f"{vae['steps']} updates at {vae['steps_per_second']:.2f} updates/s.")
    r.image(folder / "vae" / "metrics.png", "VAE training curves over updates: total loss, reconstruction, KL and "
            "the decaying β (raw and smoothed).")
    rec = records["reconstruct"]
    r.image(folder / "reconstruct" / "reconstructions.png", f"Held-out faces (left) and their reconstructions (right); "
            f"mean PSNR {rec['mean_psnr']:.2f} dB, mean SSIM {rec['mean_ssim']:.4f}.")
    r.table(["image", "PSNR (dB)", "SSIM"], [[str(i), f"{p:.2f}", f"{s:.4f}"]
                                             for i, (p, s) in enumerate(zip(rec["psnr"], rec["ssim"]))])
    r.image(folder / "reconstruct" / "interpolations.png",
            "Decoded linear interpolations between the latents of pairs of faces: a smooth latent space gives "
            "plausible faces all the way.")
    r.image(folder / "reconstruct" / "prior.png",
            "Decoded prior samples z ~ N(0, I): where they are not faces, the VAE's latents are not Gaussian "
            "enough to sample directly — which is why a diffusion model is trained on them.")
    r.code((folder / "vae" / "config.toml").read_text())

    r.heading(f"2. Noise schedules (T = {SCHEDULE_T})")
    for warning in records["schedule-plot"].get("warnings", []):
        r.text("Note: " + warning)
    r.image(folder / "schedules" / "schedules.png", "β_t and ᾱ_t of the linear and cosine schedules at T = 10.")
    header, *rows = (folder / "schedules" / "schedules.csv").read_text().strip().splitlines()
    r.table(header.split(","), [row.split(",") for row in rows])
    r.image(folder / "schedules" / "noised-latents.png",
            "A held-out face's latent noised at every timestep with the same ε and decoded: a row per schedule.")

    r.heading("3. Denoiser (v-prediction ConvNeXt U-Net)")
    r.text(f"{den['steps']} updates at {den['steps_per_second']:.2f} updates/s on the VAE's cached latents.")
    r.image(folder / "denoiser" / "metrics.png", "Denoiser v-loss over updates (raw and smoothed) and, measured every few hundred updates on "
            "a fixed draw of DDIM-10 samples, their Fréchet distance to the training faces in the face-attribute "
            "network's features (lower is better) and their legibility (higher is better).")
    r.code((folder / "denoiser" / "config.toml").read_text())

    r.heading("4. Sampling")
    for sampler, name in (("ddpm", "DDPM"), ("ddim", "DDIM")):
        rec = records[f"sample-{sampler}"]
        r.image(folder / f"samples-{sampler}" / "grid.png",
                f"{NUM_SAMPLES} faces sampled with {name} in {rec['steps']} steps ({rec['sampling_seconds']:.1f} s).")
        r.image(folder / f"samples-{sampler}" / "trajectory.png",
                f"The {name} reverse process: the decoded model input z_t and its predicted clean latent at evenly "
                "spaced steps.")
        r.image(folder / f"samples-{sampler}" / "trajectory.gif",
                f"The {name} reverse process as an animation: z_t (top) and the predicted clean image (bottom) "
                "of each traced sample, step by step.")

    r.heading("5. Sample quality")
    scores = records["evaluate"]["scores"]
    r.table(*quality_table(scores))
    r.text(quality_reading(scores))

    r.heading("6. Reimagine")
    r.image(folder / "reimagine" / "reimagine.png",
            "A held-out face noised to t = strength·T and brought back by DDPM (all remaining steps) and DDIM "
            "(50·strength steps) for two seeds from the same noised latent: DDPM varies with the seed, DDIM "
            "(deterministic) gives the same image.")
    r.image(folder / "reimagine" / "reimagine-trajectory.png",
            "Predicted clean images along the DDPM and DDIM reverse processes at the middle strength.")
    return r


QUALITY_SETS = {"samples": f"DDIM-50 samples ({EVAL_SAMPLES})", "floor": "held-out real faces (floor)",
                "vae_reconstruction": "their VAE reconstructions", "prior": "decoded z ~ N(0, I) (prior)"}


def quality_table(scores: dict[str, dict[str, Any] | None]) -> tuple[list[str], list[list[str]]]:
    """FD, legibility, precision and recall of the samples and the three references."""
    def cell(value: float | None, digits: str) -> str:
        return "n/a" if value is None else format(value, digits)

    rows = [[label, cell(s["fd"], ".2f"), cell(s["legibility"], ".3f"), cell(s["precision"], ".3f"),
             cell(s["recall"], ".3f")] for name, label in QUALITY_SETS.items() if (s := scores.get(name))]
    return ["set", "FD", "legibility", "precision", "recall"], rows


def quality_reading(scores: dict[str, dict[str, Any] | None]) -> str:
    """Where the samples' FD lies between the decoded prior and the floor."""
    fd = {name: s["fd"] for name, s in scores.items() if s is not None}
    gap = fd["prior"] - fd["floor"]
    closed = (fd["prior"] - fd["samples"]) / gap if gap > 0 else float("nan")
    return (f"FD in the face-attribute network's features, against builtin:faces' training faces (lower is better; "
            f"legibility: the share of images on which every attribute is read with p ≥ 0.9). The samples' FD, "
            f"{fd['samples']:.2f}, closes {closed:.0%} of the gap from the decoded prior ({fd['prior']:.2f}) to real "
            f"faces ({fd['floor']:.2f}); the VAE's reconstructions ({fd['vae_reconstruction']:.2f}) bound what a "
            "latent model with this VAE can reach.")


@dataclass
class DemoResult:
    folder: Path
    records: dict[str, dict[str, Any]]
    report_md: Path
    report_html: Path


def run_demo(folder: Path, minutes: float = DEFAULT_MINUTES, seed: int = 0, vae_overrides: list[str] = (),
             denoiser_overrides: list[str] = (), scale: float | None = None) -> DemoResult:
    """Run (or reuse) every stage in `folder`, then write the report. The overrides
    (`section.key=value`) change the quickstart configs, e.g. to shrink them in tests;
    `scale` trains their updates × `scale` instead of sizing them to `minutes` here."""
    if minutes <= 0:
        raise UsageError(f"--minutes {minutes}: must be positive")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out '{folder}': exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    budget = (DemoBudget(minutes, scale) if scale is not None
              else demo_budget(folder, minutes, vae_overrides, denoiser_overrides))
    records = run_stages(demo_stages(folder, budget, seed, vae_overrides, denoiser_overrides), folder / "stages.json")
    md, page = build_report(folder, records, budget).write()
    return DemoResult(folder, records, md, page)
