"""Latent size and β against reconstruction: short quickstart-VAE runs side by side.

For each variant it trains `--steps` updates of configs/quickstart/vae.toml and prints
the mean PSNR/SSIM of `reconstruct` on 32 held-out images and the KL per latent element
(mean of the last 20 updates): more latent channels reconstruct better; a larger β keeps
the posterior closer to N(0, I) (a smoother latent space) at some cost in PSNR.

    PYTHONPATH=src python benchmarks/vae_tradeoff.py --steps 500 --out runs/vae-tradeoff
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ldm_cli.commands.reconstruct import run_reconstruct
from ldm_cli.config import VAERunConfig, load_config, packaged_config
from ldm_cli.training.vae_task import train_vae

VARIANTS = {
    "latent 2x8x8, beta 1e-3 -> 1e-5": ["model.latent_channels=2"],
    "latent 4x8x8, beta 1e-3 -> 1e-5": [],
    "latent 8x8x8, beta 1e-3 -> 1e-5": ["model.latent_channels=8"],
    "latent 4x8x8, beta 1e-2 fixed": ["loss.beta_start=1e-2", "loss.beta_final=1e-2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("runs/vae-tradeoff"))
    args = parser.parse_args()
    for i, (name, sets) in enumerate(VARIANTS.items()):
        out = args.out / f"variant-{i}"
        cfg = load_config(VAERunConfig, packaged_config("quickstart/vae.toml"), sets + [
            f"train.max_steps={args.steps}", f"loss.beta_decay_steps={int(args.steps * 0.75)}",
            "logging.checkpoint_every=100000", "logging.preview_every=100000", "optim.warmup_steps=50",
            f"output.dir='{out}'"])
        result = train_vae(cfg, overwrite=True)
        report = run_reconstruct(out / "vae.safetensors", out / "reconstruct", num=32, overwrite=True)
        with open(out / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        kl = sum(float(r["kl"]) for r in rows[-20:]) / len(rows[-20:])
        print(f"{name:34s} PSNR {report.mean_psnr:.2f} dB  SSIM {report.mean_ssim:.3f}  KL/elem {kl:.3f}  "
              f"{result.steps_per_second:.2f} steps/s", flush=True)


if __name__ == "__main__":
    main()
