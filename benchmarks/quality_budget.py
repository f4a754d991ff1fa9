"""Sample quality per CPU-minute: the quickstart pipeline trained under wall-clock budgets.

    python benchmarks/quality_budget.py                          # baseline and defaults, 2/5/10 min, 2 runs each
    python benchmarks/quality_budget.py --configs defaults --budgets 5 --runs 1 \\
        --name wide --den-set model.base_channels=96              # one variant of the study

For each configuration and budget B (minutes of wall clock for the whole training
pipeline: train-vae, the latent cache, train-denoiser), and for each run (seed r for
both stages):

1. Calibrate the baseline once: 40 updates of each stage give seconds per update and
   the fixed cost of each stage (start-up, latent cache, export), cached in
   OUT/calibration.json. Every other configuration (`defaults` too) takes those seconds
   multiplied by its update-time ratio to the baseline, timed in alternation (once per
   pair of speed settings, also cached), so a machine whose speed drifted between two
   calibrations does not tilt the comparison.
2. Scale both configs' `train.max_steps` by one factor, so that the two stages together
   fit B (the configs' step ratio is their time split); warm-up and β decay scale as in
   `ldm demo`. Periodic quality measurement is off; checkpoints are written at the end.
3. Train, then sample 500 images with DDIM-50 (batch 250; sampling time alone, as
   seconds per image) and score them with the packaged face-attribute network against
   the training faces: FD and legibility (docs/MATH.md §7), plus the FD of VAE
   reconstructions of 500 held-out faces, which bounds what the latent route can reach.

Every run appends a row to OUT/results.jsonl (so runs of several invocations collect in
one table), and the script prints the table of all rows, grouped by configuration and
budget: both runs, their mean and their spread. Rows already in the file are not rerun.

Configurations: `baseline` is the quickstart configs frozen on 2026-11-29
(benchmarks/configs/baseline/), `defaults` the packaged configs/quickstart/ of this
checkout; `--name N --base B --vae-set k=v --den-set k=v` adds a variant of B.
Budgets are wall-clock, so run it on a quiet machine; the actual seconds of each stage
are in the table.

Two cheaper forms for a study, both keeping the budget's step counts:
  --stage vae        train the VAE only (its share of the budget) and score its
                     reconstructions: for VAE settings, read by recon FD.
  --vae-from NAME    train the denoiser only, on the VAE of run NAME's folder at the same
                     budget and run index: for denoiser settings, with the VAE fixed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ldm_cli.commands.demo import budget_config
from ldm_cli.commands.study_measure import Setting, decoded_uint8, timed_latents, warm_up
from ldm_cli.common.device import resolve_precision
from ldm_cli.config import DataConfig, DenoiserRunConfig, VAERunConfig, packaged_config
from ldm_cli.evaluation.face_quality import (
    heldout_faces,
    load_face_network,
    load_or_build_reference,
    reconstruction_batches,
    score_faces,
)
from ldm_cli.modelfiles.bundles import load_denoiser, load_vae
from ldm_cli.training.budget import Calibration, denoiser_update, vae_update
from ldm_cli.training.denoiser_task import train_denoiser
from ldm_cli.training.speed import resolve_speed
from ldm_cli.training.vae_task import train_vae

HERE = Path(__file__).resolve().parent
CONFIG_FILES = {
    "baseline": (HERE / "configs" / "baseline" / "vae.toml", HERE / "configs" / "baseline" / "denoiser.toml"),
    "defaults": (packaged_config("quickstart/vae.toml"), packaged_config("quickstart/denoiser.toml")),
}
CALIBRATION_STEPS = 40
NUM_SAMPLES = 500
SAMPLING_BATCH = 250
SAMPLE_SEED = 0
END_ONLY = 10**9  # checkpoint and preview only when the run ends


@dataclass(frozen=True)
class Configuration:
    """A pair of configs (VAE, denoiser) and the overrides of a variant."""

    name: str
    base: str
    vae_set: tuple[str, ...] = ()
    den_set: tuple[str, ...] = ()
    vae_share: float | None = None  # of the training time; None: as the configs' step counts split it
    relative_to: str | None = None  # take that configuration's step counts, scaled by the speed ratio

    @property
    def files(self) -> tuple[Path, Path]:
        return CONFIG_FILES[self.base]


@dataclass
class Row:
    config: str
    budget_minutes: float
    run: int
    vae_steps: int
    den_steps: int
    vae_seconds: float
    den_seconds: float
    fd: float
    legibility: float
    recon_fd: float
    kid: float
    precision: float | None
    recall: float | None
    seconds_per_image: float
    threads: int
    settings: dict = field(default_factory=dict)
    stage: str = "both"  # "both", "vae" (VAE only) or "denoiser" (on another run's VAE)
    sampling_precision: str = "fp32"  # of the model calls behind fd, legibility and seconds_per_image
    other_precisions: dict = field(default_factory=dict)  # precision → the same scores sampled in it
    recon_legibility: float = float("nan")  # of the reconstructions behind recon_fd (rows before 2026-11-30: not measured)

    @property
    def pipeline_seconds(self) -> float:
        return self.vae_seconds + self.den_seconds


# --------------------------------------------------------------------------- training


def stage_configs(conf: Configuration, factors: tuple[float, float], folder: Path,
                  seed: int) -> tuple[VAERunConfig, DenoiserRunConfig]:
    """Both stages' configs, their steps scaled by `factors`, quality measurement off."""
    vae_file, den_file = conf.files
    common = {"train.seed": seed, "logging.checkpoint_every": END_ONLY, "logging.preview_every": END_ONLY}
    vae_cfg = budget_config(VAERunConfig, vae_file, list(conf.vae_set), factors[0], folder / "vae", common)
    den_cfg = budget_config(DenoiserRunConfig, den_file, list(conf.den_set), factors[1], folder / "denoiser",
                            {**common, "quality.every": 0, "latents.vae": str(folder / "vae" / "vae.safetensors")})
    return vae_cfg, den_cfg


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def train_pipeline(vae_cfg: VAERunConfig, den_cfg: DenoiserRunConfig) -> tuple[object, float, object, float]:
    vae_result, vae_seconds = timed(train_vae, vae_cfg, overwrite=True)
    den_result, den_seconds = timed(train_denoiser, den_cfg, overwrite=True)
    return vae_result, vae_seconds, den_result, den_seconds


def train_stage(stage: str, vae_cfg: VAERunConfig, den_cfg: DenoiserRunConfig, vae_file: Path | None,
                ) -> tuple[float, float]:
    """Train what `stage` says; the seconds of the VAE and of the denoiser (0 for a stage not run)."""
    if stage == "both":
        _, vae_s, _, den_s = train_pipeline(vae_cfg, den_cfg)
        return vae_s, den_s
    if stage == "vae":
        return timed(train_vae, vae_cfg, overwrite=True)[1], 0.0
    den_cfg = den_cfg.model_copy(update={"latents": den_cfg.latents.model_copy(update={"vae": str(vae_file)})})
    return 0.0, timed(train_denoiser, den_cfg, overwrite=True)[1]


SPEED_KEYS = ("model", "train.batch_size", "train.grad_accum_steps", "optim.fused")  # with the resolved speed settings
COST_NEUTRAL_MODEL_KEYS = ("layer_scale_init",)  # an initial value: the same operations, so the same updates
KEYED_ONLY_WHEN_ON = ("self_condition",)  # options newer than the cached ratios: while off, not in the key
TIMED_STRUCTURAL_TERMS = ("ssim", None)  # what every cached ratio was timed with (VAE: SSIM; denoiser: none)


def speed_settings(config: VAERunConfig | DenoiserRunConfig) -> dict:
    """What sets the cost of an update: the model, the batch and the speed settings that
    training resolves on this CPU (so a change of what `auto` means is a new pair to time)."""
    dumped = config.model_dump(mode="json")
    for key in COST_NEUTRAL_MODEL_KEYS:  # timed as at their default, so a ratio already measured still applies
        if key in dumped["model"]:
            dumped["model"][key] = type(config.model).model_fields[key].default
    for key in KEYED_ONLY_WHEN_ON:
        if not dumped["model"].get(key, True):
            del dumped["model"][key]
    chosen = {key: dumped[key] if "." not in key else dumped[key.split(".")[0]][key.split(".")[1]] for key in SPEED_KEYS}
    term = structural_term(config)
    if term not in TIMED_STRUCTURAL_TERMS:  # keyed only when it differs, so the ratios already cached still apply
        chosen["loss.structural"] = term
    return chosen | asdict(resolve_speed(config.train, on_cuda=False, model=config.task_name))


def structural_term(config: VAERunConfig | DenoiserRunConfig) -> str | None:
    """The VAE loss's structural term, which costs time when it is on: "ssim", "ms-ssim" or
    "off" (its weight does not change the cost); None for the denoiser."""
    loss = getattr(config, "loss", None)
    if loss is None:
        return None
    return loss.structural if loss.structural_weight > 0 else "off"


def update_time_ratio(conf: Configuration, ref_conf: Configuration, repeats: int = 15) -> tuple[float, float]:
    """(VAE, denoiser) seconds per update of `conf` over those of `ref_conf`: exactly 1 when
    nothing that sets the cost of an update differs, else the ratio of medians of updates
    timed in alternation (so that a change in the machine's load hits both alike)."""
    configs = [stage_configs(c, (1.0, 1.0), Path("unused"), 0) for c in (conf, ref_conf)]
    ratios = []
    for stage, build in ((0, vae_update), (1, denoiser_update)):
        mine, theirs = configs[0][stage], configs[1][stage]
        if speed_settings(mine) == speed_settings(theirs):
            ratios.append(1.0)
            continue
        speeds = [resolve_speed(c.train, on_cuda=False, model=c.task_name) for c in (mine, theirs)]  # as training would run
        steps = [build(c, s.channels_last, s.compile, s.bf16) for c, s in zip((mine, theirs), speeds)]
        times: list[list[float]] = [[], []]
        for i in range(repeats + 3):
            for k in (0, 1):
                start = time.perf_counter()
                steps[k]()
                if i >= 3:
                    times[k].append(time.perf_counter() - start)
        ratios.append(statistics.median(times[0]) / statistics.median(times[1]))
    return ratios[0], ratios[1]


def remembered(out: Path, key: str, measure: Callable[[], Any]) -> Any:
    """`measure()` the first time `key` is asked for, then its value cached in
    OUT/calibration.json (calibrations and update-time ratios share the file)."""
    path = out / "calibration.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key not in known:
        known[key] = measure()
        path.write_text(json.dumps(known, indent=2))
    return known[key]


def cached_ratio(conf: Configuration, ref_conf: Configuration, out: Path) -> tuple[float, float]:
    """`update_time_ratio`, measured once per pair of speed settings: variants that change
    nothing that sets an update's cost get exactly the step counts of the configuration
    they vary, not a fresh, noisy ratio."""
    pair = [stage_configs(c, (1.0, 1.0), Path("unused"), 0) for c in (conf, ref_conf)]
    key = "ratio:" + hashlib.sha256(json.dumps([[speed_settings(c) for c in stages] for stages in pair],
                                               sort_keys=True).encode()).hexdigest()[:16]
    vae_ratio, den_ratio = remembered(out, key, lambda: list(update_time_ratio(conf, ref_conf)))
    return vae_ratio, den_ratio


def relative_factors(conf: Configuration, ref: Calibration, ratios: tuple[float, float],
                     budget_seconds: float) -> tuple[float, float]:
    """Factors of `conf`'s step counts for this budget, from the reference's calibration with
    its seconds per update multiplied by the measured `ratios`: the same wall clock as the
    reference, split as `conf.vae_share` says or else as `conf`'s own step counts do."""
    own_vae, own_den = stage_configs(conf, (1.0, 1.0), Path("unused"), 0)
    vae_update, den_update = ref.vae_update * ratios[0], ref.den_update * ratios[1]
    own = Calibration(vae_update, ref.vae_fixed, den_update, ref.den_fixed, own_vae.train.max_steps,
                      own_den.train.max_steps)
    return own.factors(budget_seconds, conf.vae_share)


def calibrate(conf: Configuration, out: Path) -> Calibration:
    """Seconds per update and fixed seconds of each stage (measured once, then cached)."""
    return Calibration(**remembered(out, conf.name, lambda: asdict(measure_calibration(conf, out))))


def measure_calibration(conf: Configuration, out: Path) -> Calibration:
    """Time CALIBRATION_STEPS updates of each stage, and the rest of each stage's wall time."""
    full_vae, full_den = stage_configs(conf, (1.0, 1.0), out / "calibration" / conf.name, 0)
    factors = (CALIBRATION_STEPS / full_vae.train.max_steps, CALIBRATION_STEPS / full_den.train.max_steps)
    vae_cfg, den_cfg = stage_configs(conf, factors, out / "calibration" / conf.name, 0)
    vae_res, vae_s, den_res, den_s = train_pipeline(vae_cfg, den_cfg)
    vae_update, den_update = 1 / vae_res.steps_per_second, 1 / den_res.steps_per_second
    cal = Calibration(vae_update, vae_s - vae_res.seconds, den_update, den_s - den_res.seconds,
                      full_vae.train.max_steps, full_den.train.max_steps)
    print(f"calibrated {conf.name}: VAE {vae_update * 1000:.0f} ms/update + {cal.vae_fixed:.1f} s, "
          f"denoiser {den_update * 1000:.0f} ms/update + {cal.den_fixed:.1f} s", flush=True)
    return cal


# --------------------------------------------------------------------------- scoring


def score_samples(denoiser: Path, network, reference, precision: str) -> dict[str, float | None]:
    """FD, legibility, KID, P/R of NUM_SAMPLES DDIM-50 samples, and the sampling seconds per
    image, with the model calls in `precision`."""
    bundle = load_denoiser(denoiser)
    device = torch.device("cpu")
    bundle.to(device)
    warm_up(bundle, device)
    latents, seconds = timed_latents(bundle, Setting("ddim", 50), NUM_SAMPLES, SAMPLE_SEED, device,
                                     batch_size=SAMPLING_BATCH, precision=precision)
    scores = score_faces(decoded_uint8(bundle, latents), reference, network, progress=False)
    return {"fd": scores.fd, "legibility": scores.legibility, "kid": scores.kid_mean, "precision": scores.precision,
            "recall": scores.recall, "seconds_per_image": seconds / NUM_SAMPLES}


def score_reconstructions(vae_file: Path, data: DataConfig, network, reference) -> tuple[float, float]:
    """FD and legibility of the VAE's reconstructions of NUM_SAMPLES held-out faces."""
    held = heldout_faces(data, NUM_SAMPLES)
    recon = reconstruction_batches(load_vae(vae_file), held)
    scores = score_faces(recon, reference, network, total=len(held), progress=False)
    return scores.fd, scores.legibility


NOT_MEASURED = {"fd": float("nan"), "legibility": float("nan"), "kid": float("nan"), "precision": None,
                "recall": None, "seconds_per_image": float("nan")}


# --------------------------------------------------------------------------- the table


def read_rows(path: Path) -> list[Row]:
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f}" + (f" ± {(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else "")


def print_table(rows: list[Row]) -> None:
    head = (f"{'config':<22}{'min':>5}{'run':>4}{'VAE upd':>8}{'den upd':>8}{'VAE s':>7}{'den s':>7}"
            f"{'FD':>8}{'legib':>7}{'recon FD':>9}{'s/img':>8}")
    print(head)
    print("-" * len(head))
    groups: dict[tuple[str, float], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.config, row.budget_minutes), []).append(row)
    order = sorted(groups, key=lambda k: (k[0] != "baseline", k[0], k[1]))
    for key in order:
        for r in sorted(groups[key], key=lambda r: r.run):
            print(f"{r.config:<22}{r.budget_minutes:>5g}{r.run:>4}{r.vae_steps:>8}{r.den_steps:>8}"
                  f"{r.vae_seconds:>7.0f}{r.den_seconds:>7.0f}{r.fd:>8.2f}{r.legibility:>7.3f}{r.recon_fd:>9.2f}"
                  f"{r.seconds_per_image:>8.4f}")
        group = groups[key]
        print(f"{'':<22}{'':>5}{'':>4}  mean ± half-range: FD {spread([r.fd for r in group])}, "
              f"legibility {spread([r.legibility for r in group])}, recon FD {spread([r.recon_fd for r in group])}")


# --------------------------------------------------------------------------- main


def configurations(args: argparse.Namespace) -> list[Configuration]:
    # `defaults` takes the baseline's calibration, scaled by measured update-time ratios, so the
    # two are compared at the same wall clock even when the machine's speed drifted in between
    confs = [Configuration(name, name, relative_to=None if name == "baseline" else "baseline") for name in args.configs]
    if args.name:
        confs.append(Configuration(args.name, args.base, tuple(args.vae_set), tuple(args.den_set), args.vae_share,
                                   args.relative_to))
    return confs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["baseline", "defaults"], choices=sorted(CONFIG_FILES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[2, 5, 10], help="minutes of wall clock")
    parser.add_argument("--runs", type=int, default=2, help="runs per configuration and budget (seeds 0, 1, …)")
    parser.add_argument("--name", help="a variant: its name in the table")
    parser.add_argument("--base", default="defaults", choices=sorted(CONFIG_FILES), help="the configs a variant changes")
    parser.add_argument("--vae-set", action="append", default=[], help="section.key=value for the VAE config")
    parser.add_argument("--den-set", action="append", default=[], help="section.key=value for the denoiser config")
    parser.add_argument("--vae-share", type=float, help="a variant's VAE share of the training time "
                        "(default: as its configs' step counts split it)")
    parser.add_argument("--relative-to", choices=sorted(CONFIG_FILES), help="a variant takes this configuration's "
                        "step counts, scaled by the ratio of median update times (robust on a busy machine)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("runs/quality-budget"))
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.jsonl and stop")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["auto", "fp32", "bf16"],
                        help="of the sampling model calls: the first gives the table's scores, the others are "
                             "scored too and kept in results.jsonl")
    parser.add_argument("--stage", choices=["both", "vae"], default="both", help="vae: train and score the VAE only")
    parser.add_argument("--vae-from", help="train the denoiser only, on the VAE of this configuration's runs")
    args = parser.parse_args()
    stage = "denoiser" if args.vae_from else args.stage
    results = args.out / "results.jsonl"
    if args.table:
        print_table(read_rows(results))
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    network = load_face_network()
    for conf in configurations(args):
        vae_file, _ = conf.files
        data = budget_config(VAERunConfig, vae_file, list(conf.vae_set), 1.0, args.out).data
        reference, _path, _cached = load_or_build_reference(data, network)
        ref_conf = Configuration(conf.relative_to, conf.relative_to) if conf.relative_to else None
        calibration = calibrate(ref_conf or conf, args.out)
        ratios = cached_ratio(conf, ref_conf, args.out) if ref_conf else (1.0, 1.0)
        if ref_conf:
            print(f"{conf.name}: update time / {ref_conf.name}'s: VAE {ratios[0]:.3f}, denoiser {ratios[1]:.3f}",
                  flush=True)
        for budget in args.budgets:
            for run in range(args.runs):
                done = {(r.config, r.budget_minutes, r.run) for r in read_rows(results)}
                if (conf.name, budget, run) in done:
                    continue
                folder = args.out / conf.name / f"{budget:g}min-run{run}"
                factors = (relative_factors(conf, calibration, ratios, budget * 60) if ref_conf
                           else calibration.factors(budget * 60, conf.vae_share))
                vae_cfg, den_cfg = stage_configs(conf, factors, folder, run)
                vae_file = folder / "vae" / "vae.safetensors"
                if stage == "denoiser":
                    vae_file = args.out / args.vae_from / f"{budget:g}min-run{run}" / "vae" / "vae.safetensors"
                    if not vae_file.is_file():
                        raise SystemExit(f"--vae-from {args.vae_from}: {vae_file} not found; run that configuration first")
                vae_s, den_s = train_stage(stage, vae_cfg, den_cfg, vae_file)
                denoiser = folder / "denoiser" / "denoiser.safetensors"
                precisions = [resolve_precision(p, "cpu") for p in args.precision]
                scores = NOT_MEASURED if stage == "vae" else score_samples(denoiser, network, reference, precisions[0])
                others = {} if stage == "vae" else {p: score_samples(denoiser, network, reference, p)
                                                    for p in precisions[1:]}
                recon_fd, recon_legibility = score_reconstructions(vae_file, data, network, reference)
                row = Row(conf.name, budget, run, vae_cfg.train.max_steps if stage != "denoiser" else 0,
                          den_cfg.train.max_steps if stage != "vae" else 0, vae_s, den_s, recon_fd=recon_fd,
                          threads=args.threads, settings={"vae": list(conf.vae_set), "denoiser": list(conf.den_set),
                                                          "vae_from": args.vae_from}, stage=stage,
                          sampling_precision=precisions[0], other_precisions=others,
                          recon_legibility=recon_legibility, **scores)
                with results.open("a") as f:
                    f.write(json.dumps(asdict(row)) + "\n")
                print(f"{conf.name} {budget:g} min run {run}: FD {row.fd:.2f}, legibility {row.legibility:.3f}, "
                      f"{row.pipeline_seconds:.0f} s", flush=True)
    print_table(read_rows(results))


if __name__ == "__main__":
    main()
