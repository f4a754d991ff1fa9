"""The plots of `ldm study`, and the one-line reading of each, computed from its numbers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ldm_cli.commands.study_measure import ROUTES, SetResult, StrengthResult, pareto_front
from ldm_cli.commands.study_schedules import QualityCurve
from ldm_cli.common.pictures import save_figure, save_panels

WITHIN = 0.05  # "as good as": an FD within 5 % of the reference setting's
GIVEN_BACK_DB = 1.0  # inversion "gives the input back" within this much of the VAE reconstruction's PSNR


def clip_name(limit: float | None) -> str:
    return "off" if limit is None else f"{limit:g}"


# --------------------------------------------------------------------------- 1. steps and samplers


def plot_pareto(results: Sequence[SetResult], path: Path) -> Path:
    """FD against seconds per image (log x), every setting labelled, the Pareto front joined."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"ddim": "tab:blue", "dpm++2m": "tab:orange", "ddpm": "tab:red"}
    for r in results:
        ax.scatter(r.seconds_per_image, r.scores.fd, color=colors[r.setting.sampler], zorder=3)
        ax.annotate(r.setting.label, (r.seconds_per_image, r.scores.fd), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    front = pareto_front(results)
    ax.plot([r.seconds_per_image for r in front], [r.scores.fd for r in front], color="black", linestyle="--",
            linewidth=1, label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image (reverse chain)")
    ax.set_ylabel("FD (face features, lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def pareto_reading(results: Sequence[SetResult]) -> str:
    """The cheapest setting whose FD is within 5 % of the slowest DDIM's (else of the best), and what it saves."""
    ddims = [r for r in results if r.setting.sampler == "ddim"]
    reference = max(ddims, key=lambda r: r.model_steps) if ddims else min(results, key=lambda r: r.scores.fd)
    good = [r for r in results if r.scores.fd <= reference.scores.fd * (1 + WITHIN)]
    cheapest = min(good, key=lambda r: r.seconds_per_image)
    front = ", ".join(r.setting.label for r in pareto_front(results))
    if cheapest is reference:
        return (f"Nothing faster comes within {WITHIN:.0%} of {reference.setting.label}'s FD "
                f"({reference.scores.fd:.3g}); the Pareto front is {front}.")
    speedup = reference.seconds_per_image / max(cheapest.seconds_per_image, 1e-12)
    return (f"{cheapest.setting.label} reaches within {WITHIN:.0%} of {reference.setting.label}'s FD "
            f"({cheapest.scores.fd:.3g} vs {reference.scores.fd:.3g}) at {speedup:.1f}× less time per image; "
            f"the Pareto front is {front}.")


# --------------------------------------------------------------------------- 2. diversity


def plot_diversity(strengths: Sequence[StrengthResult], path: Path) -> Path:
    """Mean pairwise feature distance of the K reimaginings against strength, DDPM and DDIM."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    xs = [s.strength for s in strengths]
    ax.plot(xs, [s.diversity_ddpm for s in strengths], marker="o", label="DDPM")
    ax.plot(xs, [s.diversity_ddim for s in strengths], marker="s", label="DDIM")
    ax.set_xlabel("strength")
    ax.set_ylabel("mean pairwise feature distance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def diversity_reading(strengths: Sequence[StrengthResult], recall: dict[str, float | None], count: int) -> str:
    """How DDPM's spread grows with strength, that DDIM has none, and the two sample sets' recall."""
    low, high = strengths[0], strengths[-1]
    ddim_max = max(s.diversity_ddim for s in strengths)
    ddim = "identical (distance 0)" if ddim_max == 0 else f"nearly identical (at most {ddim_max:.2g})"
    recalls = ", ".join(f"{name} {'n/a' if value is None else f'{value:.2f}'}" for name, value in recall.items())
    return (f"From one noised latent, DDPM's {count} reimaginings spread by {low.diversity_ddpm:.3g} at strength "
            f"{low.strength:g} and {high.diversity_ddpm:.3g} at {high.strength:g}, while DDIM's are {ddim} at every "
            f"strength; recall: {recalls}.")


# --------------------------------------------------------------------------- 3. clip limit


def plot_clip(results: Sequence[SetResult], path: Path) -> Path:
    """FD and legibility of each clip limit, side by side."""
    fig, (ax_fd, ax_leg) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    names = [clip_name(r.setting.clip_limit) for r in results]
    ax_fd.plot(names, [r.scores.fd for r in results], marker="o", color="tab:blue")
    ax_leg.plot(names, [r.scores.legibility for r in results], marker="o", color="tab:green")
    ax_fd.set_ylabel("FD (lower is better)")
    ax_leg.set_ylabel("legibility (higher is better)")
    return save_panels(fig, (ax_fd, ax_leg), "clip limit of ẑ0", path)


def clip_reading(results: Sequence[SetResult]) -> str:
    """The clip limit of the best FD, against no clipping."""
    off = next((r for r in results if r.setting.clip_limit is None), results[0])
    best = min(results, key=lambda r: r.scores.fd)
    label = results[0].setting.label
    if best is off:
        return (f"For {label}, no clip limit improves on clipping off (FD {off.scores.fd:.3g}, legibility "
                f"{off.scores.legibility:.2f}).")
    gain = (off.scores.fd - best.scores.fd) / off.scores.fd
    return (f"For {label}, clip limit {clip_name(best.setting.clip_limit)} gives the best FD, {best.scores.fd:.3g} "
            f"against {off.scores.fd:.3g} with clipping off ({gain:.1%} lower; legibility "
            f"{best.scores.legibility:.2f} vs {off.scores.legibility:.2f}).")


# --------------------------------------------------------------------------- 4. fidelity


def plot_fidelity(strengths: Sequence[StrengthResult], path: Path, ceiling: float) -> Path:
    """PSNR to the input and face-feature distance to it against strength, one line per route."""
    fig, (ax_psnr, ax_feat) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    xs = [s.strength for s in strengths]
    for route, name in ROUTES.items():
        ax_psnr.plot(xs, [s.psnr[route] for s in strengths], marker="o", label=name)
        ax_feat.plot(xs, [s.feature_distance[route] for s in strengths], marker="o", label=name)
    ax_psnr.axhline(ceiling, color="grey", linestyle=":", label="VAE reconstruction")
    ax_psnr.set_ylabel("PSNR to the input (dB)")
    ax_feat.set_ylabel("feature distance to the input")
    for ax in (ax_psnr, ax_feat):
        ax.set_xlabel("strength")
        ax.grid(alpha=0.3)
    ax_psnr.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def fidelity_reading(strengths: Sequence[StrengthResult], ceiling: float) -> str:
    """What inversion keeps at the highest strength, against forward noise."""
    top = strengths[-1]
    p = top.psnr
    kept = "gives the input back" if p["inversion+ddim"] >= ceiling - GIVEN_BACK_DB else "keeps the most of the input"
    return (f"At strength {top.strength:g}, DDIM inversion + DDIM {kept} at {p['inversion+ddim']:.1f} dB "
            f"(VAE reconstruction: {ceiling:.1f} dB), while forward noise + DDIM makes another face at "
            f"{p['noise+ddim']:.1f} dB and + DDPM at {p['noise+ddpm']:.1f} dB.")


def grid_reading(strengths: Sequence[StrengthResult], count: int) -> str:
    """What the grid of reimaginings shows, from the diversity and the fidelity of its rows."""
    ddim = "are one image whatever the seed" if all(s.diversity_ddim == 0 for s in strengths) else "differ slightly"
    mean_psnr = {route: sum(s.psnr[route] for s in strengths) / len(strengths) for route in ROUTES}
    closest = max(mean_psnr, key=mean_psnr.get)
    return (f"The input and its reimaginings by strength: DDPM's {count} seeds differ, DDIM's {ddim}, and "
            f"{ROUTES[closest]} stays closest to the input ({mean_psnr[closest]:.1f} dB mean PSNR over strengths).")


# --------------------------------------------------------------------------- 5. noise schedules


def plot_schedules(curves: Sequence[QualityCurve], path: Path) -> Path:
    """FD and legibility against training updates, a line per schedule."""
    fig, (ax_fd, ax_leg) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    for curve in curves:
        ax_fd.plot(curve.steps, curve.fd, marker="o", label=curve.schedule)
        ax_leg.plot(curve.steps, curve.legibility, marker="o", label=curve.schedule)
    ax_fd.set_ylabel("FD (lower is better)")
    ax_fd.set_yscale("log")
    ax_leg.set_ylabel("legibility (higher is better)")
    ax_fd.legend(fontsize=8)
    return save_panels(fig, (ax_fd, ax_leg), "training updates", path)


def first_step_below(curve: QualityCurve, fd: float) -> int | None:
    return next((step for step, value in zip(curve.steps, curve.fd) if value <= fd), None)


def schedules_reading(curves: Sequence[QualityCurve], finals: Sequence[SetResult]) -> str:
    """Which schedule ends best, by how much, and how soon each reaches the worst one's final FD."""
    ranked = sorted(zip(curves, finals), key=lambda pair: pair[1].scores.fd)
    (best, best_final), (worst, worst_final) = ranked[0], ranked[-1]
    order = ", ".join(f"{c.schedule} {f.scores.fd:.3g}" for c, f in ranked)
    target = worst.fd[-1]
    soonest = ", ".join(f"{c.schedule} after {first_step_below(c, target)}" for c in curves
                        if first_step_below(c, target) is not None)
    return (f"After {best.steps[-1]} updates, {best.schedule} gives the lowest {best_final.setting.label} FD "
            f"(FD: {order}; legibility {best_final.scores.legibility:.2f} vs {worst_final.scores.legibility:.2f} for "
            f"{worst.schedule}). The worst schedule's final curve FD, {target:.3g}, is reached by {soonest} updates.")
