"""Pictures: labelled image grids (PIL) and line plots of metrics and schedules (matplotlib).

Every file is written atomically (to a temporary sibling, then renamed).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from ldm_cli.common.files import atomic_write

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
PAD = 2


def _as_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(N,3,H,W) uint8, or float in [-1, 1], to a uint8 (N,H,W,3) array."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def image_grid(
    images: torch.Tensor,
    ncols: int,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    min_cell: int = 96,
) -> Image.Image:
    """Tile images row-major into a grid, upscaling small cells, with optional labels."""
    pixels = _as_uint8_hwc(images)
    n, h, w, _ = pixels.shape
    nrows = math.ceil(n / ncols)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    cell_h, cell_w = h * scale, w * scale
    font = _font(max(10, min(16, cell_h // 6)))
    left = int(max((font.getlength(s) for s in row_labels), default=0)) + 10 if row_labels else 0
    top = 18 if col_labels else 0
    head = 22 if title else 0
    width = left + ncols * (cell_w + PAD) + PAD
    height = head + top + nrows * (cell_h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD + 2, 4), title, fill=TEXT, font=font)
    for c, label in enumerate(col_labels or []):
        draw.text((left + PAD + c * (cell_w + PAD) + 2, head + 2), label, fill=TEXT, font=font)
    for r, label in enumerate(row_labels or []):
        y = head + top + PAD + r * (cell_h + PAD) + cell_h // 2 - 6
        draw.text((4, y), label, fill=TEXT, font=font)
    for i in range(n):
        r, c = divmod(i, ncols)
        cell = Image.fromarray(pixels[i]).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(cell, (left + PAD + c * (cell_w + PAD), head + top + PAD + r * (cell_h + PAD)))
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, ncols: int, **labels) -> Path:
    """`image_grid` written to `path` as PNG."""
    return save_png(image_grid(images, ncols, **labels), path)


def save_images(images: torch.Tensor, folder: str | Path, start_index: int = 0) -> list[Path]:
    """Each image as its own PNG, `000000.png`, `000001.png`, … from `start_index`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        save_png(Image.fromarray(pixels), folder / f"{start_index + i:06d}.png")
        for i, pixels in enumerate(_as_uint8_hwc(images))
    ]


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard draws it."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def read_metrics(csv_path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """Each column of `metrics.csv` as (steps, values), skipping empty cells: a metric
    measured only now and then (sample quality) has fewer points than the loss."""
    columns: dict[str, tuple[list[float], list[float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None):
                    steps, values = columns.setdefault(key, ([], []))
                    steps.append(float(row["step"]))
                    values.append(float(value))
    return columns


def plot_metrics(csv_path: str | Path, png_path: str | Path, panels: Sequence[str], log_scale: Sequence[str] = ()) -> Path:
    """One panel per metric against optimizer updates: raw and smoothed for a metric of
    every update, points joined by lines for one measured now and then."""
    columns = read_metrics(csv_path)
    updates = len(columns.get("step", ([], []))[0])
    panels = [p for p in panels if p in columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        xs, values = columns[key]
        if len(values) < updates / 2:
            ax.plot(xs, values, color="tab:green", marker="o", linewidth=1.4, label="measured")
        else:
            ax.plot(xs, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="raw")
            ax.plot(xs, smooth(values), color="tab:blue", linewidth=1.6, label="smoothed")
        ax.set_title(key)
        ax.set_xlabel("update")
        if key in log_scale and min(values, default=1) > 0 and max(values) > min(values):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, png_path)


def plot_schedules(curves: dict[str, dict[str, Sequence[float]]], png_path: str | Path) -> Path:
    """β_t and ᾱ_t against t for each named schedule: `curves[name] = {"beta", "alpha_bar"}`."""
    fig, (ax_beta, ax_abar) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, c in curves.items():
        t = list(range(len(c["beta"])))
        marker = "o" if len(t) <= 50 else None
        ax_beta.plot(t, c["beta"], marker=marker, label=name)
        ax_abar.plot(t, c["alpha_bar"], marker=marker, label=name)
    ax_beta.set_title("β_t")
    ax_abar.set_title("ᾱ_t = ∏ (1 − β_i)")
    ax_abar.set_ylim(-0.02, 1.02)
    for ax in (ax_beta, ax_abar):
        ax.legend()
    return save_panels(fig, (ax_beta, ax_abar), "t", png_path)


def save_panels(fig: plt.Figure, axes: Sequence[plt.Axes], xlabel: str, path: str | Path) -> Path:
    """Label and grid every panel's x axis, lay the figure out, and save it."""
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
