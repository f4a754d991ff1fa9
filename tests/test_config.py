"""Config files, --set overrides and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm_cli.config import DenoiserRunConfig, VAERunConfig, load_config, packaged_config, parse_override, read_toml, to_toml
from ldm_cli.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_packaged_configs_load_with_consistent_downsample_factor():
    for name, schema in [("quickstart/vae.toml", VAERunConfig), ("vae.toml", VAERunConfig)]:
        cfg = load_config(schema, packaged_config(name))
        assert cfg.model.downsample_factor == 2 ** (len(cfg.model.channel_mults) - 1)


def test_repo_configs_are_the_packaged_ones():
    repo = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "vae.toml"
    assert repo.read_text() == packaged_config("quickstart/vae.toml").read_text()


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    path = write(tmp_path, "[train]\nmax_stepz = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(VAERunConfig, path)
    assert str(err.value) == f"{path}: train.max_stepz: unknown key"


def test_unknown_section_is_reported_as_an_unknown_key(tmp_path):
    path = write(tmp_path, "[trian]\nmax_steps = 3\n")
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_config(VAERunConfig, path)


def test_wrong_type_says_what_was_expected(tmp_path):
    path = write(tmp_path, '[train]\nmax_steps = "many"\n')
    with pytest.raises(ConfigError) as err:
        load_config(VAERunConfig, path)
    line = str(err.value)
    assert "train.max_steps" in line and "integer" in line and "'many'" in line


def test_every_problem_gets_its_own_line(tmp_path):
    path = write(tmp_path, "[train]\nmax_steps = 0\nbatch_size = -1\n[data]\nresolution = 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(VAERunConfig, path)
    assert len(err.value.problems) == 3
    assert all(line.startswith(str(path)) for line in err.value.problems)


def test_downsample_factor_inconsistent_with_channel_mults_is_refused(tmp_path):
    path = write(tmp_path, "[model]\nchannel_mults = [1, 2]\ndownsample_factor = 4\n")
    with pytest.raises(ConfigError, match="downsample_factor 4 needs 3 levels, but channel_mults has 2"):
        load_config(VAERunConfig, path)


def test_missing_or_malformed_toml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(VAERunConfig, tmp_path / "nope.toml")
    bad = write(tmp_path, "[train\nmax_steps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)


def test_overrides_are_typed_and_validated():
    cfg = load_config(VAERunConfig, None, ["train.max_steps=7", "model.channel_mults=[1,2,2]",
                                           "data.source=builtin:faces", "optim.lr=3e-4"])
    assert cfg.train.max_steps == 7 and cfg.model.channel_mults == [1, 2, 2]
    assert cfg.data.source == "builtin:faces" and cfg.optim.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match=r"train.max_steps: Input should be greater than 0 \(got -5\)"):
        load_config(VAERunConfig, None, ["train.max_steps=-5"])


def test_override_of_missing_key_lists_known_keys():
    with pytest.raises(ConfigError) as err:
        load_config(VAERunConfig, None, ["train.max_stepz=3"])
    assert "--set train.max_stepz: no such key" in str(err.value)
    assert "max_steps" in str(err.value)
    with pytest.raises(ConfigError, match="is a section"):
        load_config(VAERunConfig, None, ["train=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("train.max_steps")


def test_flag_values_win_over_set_overrides_and_the_file(tmp_path):
    path = write(tmp_path, "[train]\nmax_steps = 3\n")
    cfg = load_config(VAERunConfig, path, ["train.max_steps=4"], {"train.max_steps": 5, "output.dir": "x"})
    assert cfg.train.max_steps == 5 and cfg.output.dir == "x"


def test_resolved_config_round_trips_through_toml(tmp_path):
    for schema in (VAERunConfig, DenoiserRunConfig):
        cfg = load_config(schema, None, ["train.max_steps=11"])
        path = write(tmp_path, to_toml(cfg))
        assert load_config(schema, path) == cfg
