"""Comparing weights with what a module expects, to say exactly which tensors do not fit."""

from __future__ import annotations

from collections.abc import Mapping

import torch

NAMES_SHOWN = 3  # names listed per kind of difference before "and N more"


def tensor_mismatches(
    found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], prefix: str = ""
) -> list[str]:
    """What keeps `found` from loading where `expected` (a `state_dict()`) is: tensors of
    another shape or kind first, then missing and unexpected names, a few of each.
    Empty when it fits. Names are shown with `prefix.` in front when a prefix is given."""
    def named(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    differing = [d for d in (difference(named(k), found[k], expected[k]) for k in expected if k in found) if d]
    missing = [named(k) for k in expected if k not in found]
    unexpected = [named(k) for k in found if k not in expected]
    problems = [first_few(differing, "; ")] if differing else []
    problems += [f"missing: {first_few(missing)}"] if missing else []
    problems += [f"unexpected: {first_few(unexpected)}"] if unexpected else []
    return problems


def difference(name: str, found: torch.Tensor, expected: torch.Tensor) -> str | None:
    if found.shape != expected.shape:
        return f"{name} has shape {tuple(found.shape)} in the file, {tuple(expected.shape)} expected"
    if found.is_floating_point() != expected.is_floating_point():
        return f"{name} has dtype {found.dtype} in the file, {expected.dtype} expected"
    return None


def first_few(items: list[str], separator: str = ", ") -> str:
    """The first `NAMES_SHOWN` items, then how many more there are."""
    shown = separator.join(items[:NAMES_SHOWN])
    rest = len(items) - NAMES_SHOWN
    return f"{shown} and {rest} more" if rest > 0 else shown
