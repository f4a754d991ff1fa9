"""`ldm study`: answer the exercise sheet's questions with numbers, from one denoiser file.

    1. steps and samplers   FD, legibility, seconds/image of DDIM, DPM-Solver++(2M), DDPM; the Pareto front
    2. diversity            K reimaginings of one face from one noised latent: DDPM spreads, DDIM repeats itself;
                            recall of the DDPM and DDIM-50 sample sets
    3. clip limit           FD and legibility of DDIM-50 with ẑ0 clipped at several limits
    4. determinism          fidelity to the input against strength: forward noise + DDPM / + DDIM, inversion + DDIM
    5. noise schedules      with --schedules: the denoiser's run retrained with linear, cosine and sigmoid
                            schedules for the same updates; FD against updates (`study_schedules.py`)

Writes study.md and study.html (each plot followed by one line read from its numbers),
study.json (every number) and the plots, into one folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_cli.commands import study_plots as plots
from ldm_cli.commands.evaluate_faces import faces_config
from ldm_cli.commands.report import Report
from ldm_cli.commands.study_measure import (
    ROUTES,
    SetResult,
    Setting,
    StrengthResult,
    measure_set,
    measure_strength,
    pareto_front,
    reimagine,
    warm_up,
)
from ldm_cli.commands.study_schedules import QualityCurve, run_config_of, train_schedules
from ldm_cli.common.device import default_device, resolve_precision
from ldm_cli.common.files import atomic_write, claim_outputs
from ldm_cli.common.pictures import save_grid
from ldm_cli.common.progress import ProgressReporter
from ldm_cli.config import DenoiserRunConfig, load_config
from ldm_cli.data.decoding import load_image_file
from ldm_cli.data.pixels import to_float
from ldm_cli.diffusion import DEFAULT_STEPS
from ldm_cli.errors import UsageError
from ldm_cli.evaluation.face_quality import (
    FaceNetwork,
    ReferenceFaces,
    heldout_faces,
    load_face_network,
    load_or_build_reference,
)
from ldm_cli.evaluation.image_metrics import psnr
from ldm_cli.modelfiles.bundles import DenoiserBundle, load_denoiser

OUTPUTS = ("study.md", "study.html", "study.json", "study-pareto.png", "study-diversity.png", "study-clip.png",
           "study-fidelity.png", "study-reimagine.png")
SCHEDULE_OUTPUTS = ("study-schedules.png",)
MIN_SAMPLES = 4  # precision and recall need more than k = 3 images


# --------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class StudyPlan:
    """The settings of every section; `quick` shrinks them for tests."""

    sets: tuple[Setting, ...]  # section 1
    clip_limits: tuple[float | None, ...]  # section 3, on `clip_base`
    clip_base: Setting  # DDIM-50 (capped at T)
    recall_sets: tuple[Setting, ...]  # section 2b
    strengths: tuple[float, ...]  # sections 2a and 4
    num_seeds: int  # K
    reimagine_steps: int  # DDIM's steps at strength 1 (steps·strength below)
    quick: bool


def make_plan(T: int, quick: bool) -> StudyPlan:
    """The full study, or the quick one (DDPM only when T ≤ 100)."""
    ddim = (5, 10) if quick else (5, 10, 20, 50, 100, 250)
    dpm = (5,) if quick else (5, 10, 20)
    ddim50 = Setting("ddim", min(DEFAULT_STEPS, T))
    sets = [Setting("ddim", s) for s in sorted({min(s, T) for s in ddim})]
    sets += [Setting("dpm++2m", s) for s in sorted({min(s, T) for s in dpm})]
    with_ddpm = not quick or T <= 100
    sets += [Setting("ddpm", None)] if with_ddpm else []
    return StudyPlan(
        sets=tuple(sets),
        clip_limits=(None, 1.0) if quick else (None, 1.0, 1.5, 2.0, 3.0),
        clip_base=ddim50,
        recall_sets=((Setting("ddpm", None),) if with_ddpm else ()) + (ddim50,),
        strengths=(0.5, 1.0) if quick else (0.25, 0.5, 0.75, 1.0),
        num_seeds=3 if quick else 8,
        reimagine_steps=min(DEFAULT_STEPS, T),
        quick=quick,
    )


def count_measurements(plan: StudyPlan) -> int:
    """What the progress counts: distinct sample sets, then strengths."""
    sets = set(plan.sets) | set(plan.recall_sets) | {Setting("ddim", plan.clip_base.steps, c) for c in plan.clip_limits}
    return len(sets) + len(plan.strengths)


@dataclass
class StudyReport:
    """What `run_study` measured and where it wrote it."""

    out_dir: Path
    markdown: Path
    html: Path
    json_path: Path
    numbers: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleResults:
    """Section 5: each schedule's quality curve and its final model's scores."""

    curves: list[QualityCurve]
    finals: list[SetResult]

    def to_dict(self) -> dict[str, object]:
        return {"updates": self.curves[0].steps[-1],
                "runs": [{"schedule": c.schedule, "steps": c.steps, "fd": c.fd, "legibility": c.legibility,
                          "final": f.to_dict()} for c, f in zip(self.curves, self.finals)],
                "reading": plots.schedules_reading(self.curves, self.finals)}


# --------------------------------------------------------------------------- the study


def run_study(checkpoint: Path, out_dir: Path, *, num_samples: int = 256, seed: int = 0, image: Path | None = None,
              overwrite: bool = False, quick: bool = False, device: torch.device | None = None,
              schedules: bool = False, schedule_updates: int | None = None, precision: str = "auto") -> StudyReport:
    """Measure the four sections for the denoiser `checkpoint`, and with `schedules` the
    fifth (`schedule_updates` updates per run, default the run's own), and write the
    study into `out_dir`."""
    if num_samples < MIN_SAMPLES:
        raise UsageError(f"--num-samples {num_samples}: must be at least {MIN_SAMPLES}")
    if schedule_updates is not None and (not schedules or schedule_updates < 1):
        raise UsageError(f"--schedule-updates {schedule_updates}: " +
                         ("must be at least 1" if schedules else "only goes with --schedules"))
    out_dir = Path(out_dir)
    run_config = run_config_of(checkpoint) if schedules else None
    if run_config is not None and schedule_updates is None:
        schedule_updates = load_config(DenoiserRunConfig, run_config).train.max_steps
    outputs = OUTPUTS + (SCHEDULE_OUTPUTS if run_config is not None else ())
    claim_outputs([out_dir / name for name in outputs], overwrite)
    bundle = load_denoiser(checkpoint)
    original = input_image(bundle, image)
    device = device or default_device()
    precision = resolve_precision(precision, device)  # of the sample sets' model calls; reimaginings run in fp32
    bundle.to(device)
    plan = make_plan(bundle.schedule.timesteps, quick)
    network = load_face_network(device=device)
    reference, _, _ = load_or_build_reference(faces_config(bundle.vae.resolution, bundle), network)

    warm_up(bundle, device)
    measured: dict[Setting, SetResult] = {}
    with ProgressReporter("study", count_measurements(plan), unit="measurements") as progress:
        def result(setting: Setting) -> SetResult:
            if setting not in measured:
                measured[setting] = measure_set(bundle, setting, num_samples, seed, device, reference, network,
                                                precision)
                progress.advance(setting.label)
            return measured[setting]

        sets = [result(s) for s in plan.sets]
        clips = [result(Setting("ddim", plan.clip_base.steps, c)) for c in plan.clip_limits]
        recall = {s.label: result(s).scores.recall for s in plan.recall_sets}
        z0 = bundle.vae.encode(original.to(device))
        reimagined = []
        for strength in plan.strengths:
            reimagined.append(reimagine(bundle, z0, strength, plan.reimagine_steps, seed, plan.num_seeds, device))
            progress.advance(f"strength {strength:g}")
    strengths = [measure_strength(network, original, r) for r in reimagined]
    ceiling = float(psnr(bundle.vae.decode(z0).cpu(), original).mean())
    schedules = None
    if run_config is not None:
        schedules = compare_schedules(run_config, schedule_updates, out_dir, overwrite, num_samples, seed, device,
                                      reference, network, precision)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_reimagine_grid(original, reimagined, out_dir / "study-reimagine.png")
    numbers = study_numbers(checkpoint, bundle, plan, num_samples, seed, image, device, sets, clips, recall,
                            strengths, ceiling, schedules)
    numbers["precision"] = precision
    json_path = write_json(numbers, out_dir / "study.json")
    markdown, html = write_study(out_dir, checkpoint, numbers, sets, clips, recall, strengths, ceiling, plan,
                                 schedules)
    return StudyReport(out_dir, markdown, html, json_path, numbers)


def compare_schedules(run_config: Path, updates: int, out_dir: Path, overwrite: bool, num_samples: int, seed: int,
                      device: torch.device, reference: ReferenceFaces, network: FaceNetwork,
                      precision: str) -> ScheduleResults:
    """Section 5: train (or reuse) a run per schedule, then score each final model with DDIM-50."""
    curves = train_schedules(run_config, updates, out_dir, overwrite)
    finals = []
    for curve in curves:
        bundle = load_denoiser(curve.denoiser)
        bundle.to(device)
        setting = Setting("ddim", min(DEFAULT_STEPS, bundle.schedule.timesteps))
        finals.append(measure_set(bundle, setting, num_samples, seed, device, reference, network, precision))
    return ScheduleResults(curves, finals)


def input_image(bundle: DenoiserBundle, image: Path | None) -> torch.Tensor:
    """The face to reimagine, (1, 3, H, W) in [-1, 1]: `image` at the model's resolution, else the first held-out face."""
    if image is not None:
        pixels = load_image_file(image, bundle.vae.resolution)
    else:
        held_out = heldout_faces(faces_config(bundle.vae.resolution, bundle), 1)
        if len(held_out) == 0:
            raise UsageError("builtin:faces holds out no face to reimagine; pass --image")
        pixels = held_out[0]
    return to_float(pixels.unsqueeze(0))


def save_reimagine_grid(original: torch.Tensor, reimagined: list, path: Path) -> Path:
    """A column per strength: the input, then DDPM's K results, DDIM's first, and inversion + DDIM."""
    count = len(reimagined[0].ddpm)
    rows = [torch.cat([original] * len(reimagined))]
    rows += [torch.cat([r.ddpm[k:k + 1] for r in reimagined]) for k in range(count)]
    rows += [torch.cat([r.ddim[:1] for r in reimagined]), torch.cat([r.inverted for r in reimagined])]
    labels = ["input"] + [f"DDPM seed {k}" for k in range(count)] + ["DDIM (any seed)", "inversion+DDIM"]
    return save_grid(torch.cat(rows), path, ncols=len(reimagined), row_labels=labels,
                     col_labels=[f"s={r.strength:g}" for r in reimagined], title="reimaginings of one face")


# --------------------------------------------------------------------------- study.json


def study_numbers(checkpoint: Path, bundle: DenoiserBundle, plan: StudyPlan, num_samples: int, seed: int,
                  image: Path | None, device: torch.device, sets: list[SetResult], clips: list[SetResult],
                  recall: dict[str, float | None], strengths: list[StrengthResult], ceiling: float,
                  schedules: ScheduleResults | None) -> dict:
    """Every number of the study, by section."""
    return {
        "checkpoint": str(checkpoint), "timesteps": bundle.schedule.timesteps, "num_samples": num_samples,
        "seed": seed, "image": str(image) if image else "builtin:faces held-out face 0", "device": str(device),
        "quick": plan.quick,
        "steps_and_samplers": {"sets": [r.to_dict() for r in sets],
                               "pareto_front": [r.setting.label for r in pareto_front(sets)],
                               "reading": plots.pareto_reading(sets)},
        "diversity": {"num_seeds": plan.num_seeds, "strengths": [s.to_dict() for s in strengths], "recall": recall,
                      "reading": plots.diversity_reading(strengths, recall, plan.num_seeds),
                      "grid_reading": plots.grid_reading(strengths, plan.num_seeds)},
        "clip_limit": {"sets": [r.to_dict() for r in clips], "reading": plots.clip_reading(clips)},
        "determinism": {"routes": ROUTES, "vae_reconstruction_psnr": ceiling,
                        "strengths": [s.to_dict() for s in strengths],
                        "reading": plots.fidelity_reading(strengths, ceiling)},
        "noise_schedules": schedules.to_dict() if schedules is not None else "not measured (run with --schedules)",
    }


def write_json(numbers: dict, path: Path) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(numbers, indent=2, default=str) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- study.md and study.html


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def set_rows(results: list[SetResult], first: str = "setting",
             names: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """A table row per result, named by `names`, or by the setting's label."""
    names = names or [r.setting.label for r in results]
    header = [first, "model steps", "s / image", "FD", "legibility", "precision", "recall"]
    rows = [[name, str(r.model_steps), f"{r.seconds_per_image:.3g}", fmt(r.scores.fd), f"{r.scores.legibility:.2f}",
             fmt(r.scores.precision), fmt(r.scores.recall)] for name, r in zip(names, results)]
    return header, rows


def write_study(out_dir: Path, checkpoint: Path, numbers: dict, sets: list[SetResult], clips: list[SetResult],
                recall: dict[str, float | None], strengths: list[StrengthResult], ceiling: float,
                plan: StudyPlan, schedules: ScheduleResults | None) -> tuple[Path, Path]:
    """The report as study.md and study.html: a table, a plot and its reading per section."""
    r = Report(f"ldm study of {Path(checkpoint).name}", out_dir)
    r.text(f"T = {numbers['timesteps']}, {numbers['num_samples']} samples per set, seed {numbers['seed']}, on "
           f"{numbers['device']}, model calls of the sample sets in {numbers.get('precision', 'fp32')}. FD, "
           "legibility, precision and recall in the face-attribute network's features against builtin:faces' "
           "training faces; seconds per image time the reverse chain only, after a warm-up.")

    r.heading("1. Steps and samplers")
    r.table(*set_rows(sets))
    r.image(plots.plot_pareto(sets, out_dir / "study-pareto.png"), numbers["steps_and_samplers"]["reading"])

    r.heading("2. Diversity: DDPM against DDIM")
    r.table(["strength", "t", "DDIM steps", "DDPM diversity", "DDIM diversity"],
            [[f"{s.strength:g}", str(s.t), str(s.ddim_steps), fmt(s.diversity_ddpm), fmt(s.diversity_ddim)]
             for s in strengths])
    r.table(["sample set", "recall"], [[name, fmt(value)] for name, value in recall.items()])
    r.image(plots.plot_diversity(strengths, out_dir / "study-diversity.png"), numbers["diversity"]["reading"])
    r.image(out_dir / "study-reimagine.png", numbers["diversity"]["grid_reading"])

    r.heading(f"3. Clip limit ({plan.clip_base.label})")
    r.table(*set_rows(clips, first="clip limit", names=[plots.clip_name(c.setting.clip_limit) for c in clips]))
    r.image(plots.plot_clip(clips, out_dir / "study-clip.png"), numbers["clip_limit"]["reading"])

    r.heading("4. What determinism buys when reimagining")
    r.table(["strength"] + [f"PSNR {name} (dB)" for name in ROUTES.values()]
            + [f"feature dist. {name}" for name in ROUTES.values()],
            [[f"{s.strength:g}"] + [f"{s.psnr[k]:.2f}" for k in ROUTES] + [fmt(s.feature_distance[k]) for k in ROUTES]
             for s in strengths])
    r.image(plots.plot_fidelity(strengths, out_dir / "study-fidelity.png", ceiling),
            numbers["determinism"]["reading"])

    r.heading("5. Noise schedules")
    if schedules is None:
        r.text("Not measured: `ldm study --schedules` retrains the denoiser's run with the linear, cosine and "
               "sigmoid schedules for the same number of updates and compares FD against updates.")
    else:
        r.text(f"The denoiser's run config retrained for {numbers['noise_schedules']['updates']} updates with each "
               "schedule, nothing else changed; the curves are the runs' own quality measurements ([quality]), the "
               "table scores each final model as in section 1.")
        r.table(*set_rows(schedules.finals, first="schedule", names=[c.schedule for c in schedules.curves]))
        r.image(plots.plot_schedules(schedules.curves, out_dir / "study-schedules.png"),
                numbers["noise_schedules"]["reading"])
    return r.write("study")
