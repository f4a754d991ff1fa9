"""Exported models as safetensors files with JSON metadata — never pickle.

File format (docs/ARCHITECTURE.md, "Model files"): a safetensors file whose string
metadata holds `format = "ldm"`, `format_version`, `kind` (`vae` or `denoiser`) and
further JSON-encoded entries (the model config, the schedule, latent statistics, …).
A denoiser file bundles its VAE: tensors are named `denoiser.*` and `vae.*`, so the
one file is enough to sample.

Loading checks, in order, that the file exists, that it is not a pickle, that it is a
readable safetensors file written by ldm, and that it is of the expected kind; each
failure is a `CheckpointError` (exit code 2) with one line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm_cli.common.files import atomic_write
from ldm_cli.errors import CheckpointError

FORMAT = "ldm"
FORMAT_VERSION = 1
KINDS = ("vae", "denoiser")

# Magic bytes of the files people most often pass by mistake.
_PICKLE_PREFIXES = (b"\x80",)  # pickle protocol 2+ opcode PROTO
_ZIP_PREFIX = b"PK\x03\x04"  # torch.save's zip container (holds a pickle)


@dataclass(frozen=True)
class LoadedModel:
    """Tensors and decoded metadata of one exported file."""

    path: Path
    kind: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix.` with the prefix removed (e.g. `vae`)."""
        head = prefix + "."
        return {k[len(head) :]: v for k, v in self.tensors.items() if k.startswith(head)}


def save_model(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors and JSON-encoded metadata atomically as a safetensors file."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    path = Path(path)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind}
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)
    return path


def load_model(path: str | Path, expected_kind: str) -> LoadedModel:
    """Load an exported model, refusing anything that is not an ldm file of `expected_kind`."""
    path = Path(path)
    _refuse_non_safetensors(path)
    try:
        tensors = load_file(str(path))
        header = _read_metadata(path)
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint '{path}': not a readable safetensors file ({reason})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}': a safetensors file, but not one written by ldm (no ldm metadata)")
    version = int(header.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}': format version {version} is newer than this ldm understands ({FORMAT_VERSION})"
        )
    kind = header.get("kind", "?")
    if kind != expected_kind:
        raise CheckpointError(f"checkpoint '{path}': is a {kind} checkpoint, expected a {expected_kind} checkpoint")
    metadata = {k: json.loads(v) for k, v in header.items() if k not in ("format", "format_version", "kind")}
    return LoadedModel(path=path, kind=kind, tensors=tensors, metadata=metadata)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with a u64 header length, then the JSON header `{…`."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 0 < length <= size - 8 and head[8:9] == b"{"


def _refuse_non_safetensors(path: Path) -> None:
    """Name the common wrong inputs before any parser sees them; never unpickle."""
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}': no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}': is a folder, expected a .safetensors file")
    with path.open("rb") as f:
        head = f.read(9)
    if _looks_like_safetensors(head, path.stat().st_size):
        return
    if head.startswith(_ZIP_PREFIX) or head.startswith(_PICKLE_PREFIXES):
        raise CheckpointError(
            f"checkpoint '{path}': looks like a pickle / torch.save file; ldm only loads safetensors and never unpickles"
        )
    raise CheckpointError(f"checkpoint '{path}': not a readable safetensors file (no safetensors header)")


def _read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (header: u64 length, then JSON)."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length <= 0 or length > 100_000_000:
            raise ValueError(f"header length {length} out of range")
        header = json.loads(f.read(length))
    return header.get("__metadata__", {}) or {}
