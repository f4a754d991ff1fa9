"""A tiny end-to-end run whose files are digested, to pin behaviour across refactors.

`python tests/golden_run.py --write` records the digests of this machine's run in
tests/golden/tiny-run.json (one record per platform, replacing this platform's);
`test_golden_run.py` reruns it and compares with the record of its platform. The run goes
through the `ldm` command (in-process), so it does not depend on module paths:

    ldm train-vae       quickstart config, 30 updates on 512 faces
    ldm train-denoiser  quickstart config, 30 updates on that VAE
    ldm sample          DDIM-10 and DDPM (all 1000 steps), 4 images each, seed 7

Floating-point results depend on the PyTorch build, the CPU's vector instructions (and
whether it runs bfloat16 natively, which `--precision auto` and `mixed_precision = "auto"`
follow) and the thread count, so the record carries them and the test only compares like
with like.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ldm_cli.common.device import has_native_bf16

GOLDEN = Path(__file__).parent / "golden" / "tiny-run.json"
THREADS = 2
COMMON = ["--set", "data.builtin_size=512", "--max-steps", "30", "--set", "logging.checkpoint_every=15",
          "--set", "logging.preview_every=15", "--set", "optim.warmup_steps=5"]


def platform() -> dict[str, str | int]:
    """What bitwise floating-point results depend on, besides the code."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": has_native_bf16("cpu"), "threads": THREADS}


def read_records() -> list[dict]:
    """The recorded runs, one per platform (a file of one record reads as a list of one)."""
    records = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else []
    return records if isinstance(records, list) else [records]


def record_for(this: dict) -> dict | None:
    """The recorded run of platform `this`, if any."""
    return next((r for r in read_records() if r["platform"] == this), None)


def tensors_digest(path: Path) -> str:
    """SHA-256 over the tensors of a safetensors file (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    tensors = load_file(str(path))
    for key in sorted(tensors):
        value = tensors[key].contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.png")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def run_ldm(*args: str) -> None:
    from ldm_cli.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        raise RuntimeError(f"ldm {' '.join(args)} exited {result.exit_code}: {result.output}")


def tiny_run(folder: Path) -> dict[str, str]:
    """Train, sample and digest; returns {what: sha256}."""
    torch.set_num_threads(THREADS)
    vae, den = folder / "vae", folder / "denoiser"
    run_ldm("train-vae", "--out", str(vae), "--seed", "3", *COMMON)
    run_ldm("train-denoiser", "--vae", str(vae / "vae.safetensors"), "--out", str(den), "--seed", "5", *COMMON)
    checkpoint = str(den / "denoiser.safetensors")
    run_ldm("sample", "--checkpoint", checkpoint, "--ddim", "--steps", "10", "-n", "4", "--seed", "7",
            "--out", str(folder / "ddim"))
    run_ldm("sample", "--checkpoint", checkpoint, "-n", "4", "--seed", "7", "--out", str(folder / "ddpm"))
    return {
        "vae.safetensors": tensors_digest(vae / "vae.safetensors"),
        "denoiser.safetensors": tensors_digest(den / "denoiser.safetensors"),
        "ddim images": files_digest(folder / "ddim" / "images"),
        "ddpm images": files_digest(folder / "ddpm" / "images"),
    }


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record the digests in {GOLDEN}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ.setdefault("LDM_CACHE_DIR", str(Path(tmp) / "cache"))
        record = {"platform": platform(), "digests": tiny_run(Path(tmp))}
    print(json.dumps(record, indent=1))
    if args.write:
        others = [r for r in read_records() if r["platform"] != record["platform"]]
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(others + [record], indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
