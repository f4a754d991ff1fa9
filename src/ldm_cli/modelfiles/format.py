"""Exported models as safetensors files with JSON metadata — never pickle.

File format (docs/ARCHITECTURE.md, "Model files"): a safetensors file whose string
metadata holds `format = "ldm"`, `format_version`, `kind` (`vae` or `denoiser`) and
further JSON-encoded entries (the model config, the schedule, latent statistics, …).
A denoiser file bundles its VAE: tensors are named `denoiser.*` and `vae.*`, so the
one file is enough to sample.

Loading checks, in order, that the file exists, that it is not a pickle, that it is a
readable safetensors file written by ldm, that it is of the expected kind, that every
metadata field is valid JSON and that every floating tensor is finite. Readers then take
each field through `read_field` and each group of tensors through `read_tensors`, which
check it against what the reader expects. Every failure is a `CheckpointError` (exit
code 2) with one line naming the file and the field or tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm_cli.common.files import atomic_write
from ldm_cli.errors import CheckpointError, UsageError
from ldm_cli.models.state_dicts import first_few, tensor_mismatches

FORMAT = "ldm"
FORMAT_VERSION = 1
KINDS = ("vae", "denoiser")
_HEADER_FIELDS = ("format", "format_version", "kind")  # plain strings; every other field is JSON

T = TypeVar("T")

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
    _parse_field(path, header, "format_version", _format_version)
    kind = _parse_field(path, header, "kind", _kind)
    if kind != expected_kind:
        raise CheckpointError(f"checkpoint '{path}': is a {kind} checkpoint, expected a {expected_kind} checkpoint")
    metadata = {key: _parse_field(path, header, key, _json) for key in header if key not in _HEADER_FIELDS}
    _refuse_non_finite(path, tensors)
    return LoadedModel(path=path, kind=kind, tensors=tensors, metadata=metadata)


# --------------------------------------------------------------------------- metadata fields


class FieldProblem(ValueError):
    """What is wrong with a metadata field, worded to follow its name: "is not valid JSON (…)"."""


def read_field(loaded: LoadedModel, name: str, parser: Callable[[Any], T]) -> T:
    """Metadata field `name` of `loaded`, parsed by `parser` (e.g. a pydantic `model_validate`).

    The parser raises `FieldProblem`, `ValueError` (pydantic's `ValidationError` is one),
    `TypeError` or `UsageError` to refuse the value; a missing field or a refused value is
    a `CheckpointError` naming the file and the field.
    """
    return _parse_field(loaded.path, loaded.metadata, name, parser)


def _parse_field(path: Path, fields: Mapping[str, Any], name: str, parser: Callable[[Any], T]) -> T:
    if name not in fields:
        raise CheckpointError(f"checkpoint '{path}': metadata lacks '{name}' (the file is incomplete or damaged)")
    try:
        return parser(fields[name])
    except (UsageError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint '{path}': metadata field '{name}' {_problem(err)}") from None


def _problem(err: Exception) -> str:
    """The words that follow a field's name in the message for `err`."""
    if isinstance(err, FieldProblem):
        return str(err)
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"is invalid ({where + ': ' if where else ''}{first['msg']})"
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"is invalid ({reason})"


def _format_version(raw: str) -> int:
    try:
        version = int(raw)
    except ValueError:
        raise FieldProblem(f"is {raw!r}, not an integer") from None
    if version < 1:
        raise FieldProblem(f"is {version}; ldm's format versions start at 1")
    if version > FORMAT_VERSION:
        raise FieldProblem(f"is {version}, newer than this ldm understands ({FORMAT_VERSION})")
    return version


def _kind(raw: str) -> str:
    if raw not in KINDS:
        raise FieldProblem(f"is {raw!r}, not one of {', '.join(KINDS)}")
    return raw


def _refuse_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(raw: str) -> Any:
    """Decode one metadata value; NaN and Infinity, which Python's json would allow, are refused."""
    try:
        return json.loads(raw, parse_constant=_refuse_json_constant)
    except json.JSONDecodeError as err:
        raise FieldProblem(f"is not valid JSON ({err.msg} at character {err.pos})") from None
    except ValueError as err:
        raise FieldProblem(f"is not valid JSON ({err})") from None


# --------------------------------------------------------------------------- tensors


def read_tensors(
    loaded: LoadedModel, prefix: str, expected: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.` (prefix removed), refused unless they match `expected`.

    `expected` maps each name to a tensor of the right shape (a module's `state_dict()`);
    a missing, unexpected or misshapen tensor is a `CheckpointError` naming the first few.
    """
    found = loaded.part(prefix)
    problems = tensor_mismatches(found, expected, prefix)
    if problems:
        raise CheckpointError(f"checkpoint '{loaded.path}': {what} do not match its config: {'; '.join(problems)}")
    return found


def _refuse_non_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Weights from a diverged run would load and sample black images: refuse them."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        quoted = [f"'{name}'" for name in bad]
        subject = f"tensor {quoted[0]} holds" if len(bad) == 1 else f"tensors {first_few(quoted)} hold"
        raise CheckpointError(
            f"checkpoint '{path}': {subject} non-finite values (NaN/Inf); "
            "the file is damaged or came from a diverged run"
        )


# --------------------------------------------------------------------------- reading the file


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
