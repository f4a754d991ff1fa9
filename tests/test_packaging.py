"""What `pip install .` ships: every subpackage (setuptools only finds folders with an
`__init__.py`) and the packaged configs."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

import ldm_cli
from ldm_cli.config import packaged_config

SRC = Path(ldm_cli.__file__).resolve().parents[1]


def test_every_folder_of_python_modules_is_found_as_a_package():
    folders = {p.parent for p in (SRC / "ldm_cli").rglob("*.py") if "__pycache__" not in p.parts}
    found = {SRC.joinpath(*name.split(".")) for name in find_packages(str(SRC))}
    missing = sorted(str(f.relative_to(SRC)) for f in folders - found)
    assert not missing, f"not shipped by pip install (no __init__.py): {missing}"


def test_packaged_quickstart_configs_exist():
    for name in ("quickstart/vae.toml", "quickstart/denoiser.toml", "vae.toml", "denoiser.toml"):
        assert packaged_config(name).is_file(), name
