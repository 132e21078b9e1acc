"""Configs: presets by name, typed `--set` overrides, and errors that name the fix."""
import dataclasses

import pytest

from gen_jax.config import TrainConfig, apply_overrides, get_preset, parse_command_line
from gen_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    channels: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    dropout: float = 0.1
    attention: bool = True
    kind: str = "unet"


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    name: str | None = None


def small():
    """A small preset."""
    return Config()


PRESETS = {"small": small, "large": lambda: Config(model=ModelConfig(channels=128))}


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(Config(), ["model.channels=64", "model.ch_mult=1,2,4,8", "model.dropout=0",
                                     "model.attention=false", "train.grad_clip_norm=none", "name=run1"])
    assert cfg.model == ModelConfig(64, (1, 2, 4, 8), 0.0, False, "unet")
    assert cfg.train.grad_clip_norm is None and cfg.name == "run1"
    assert Config().model.channels == 32  # frozen: the preset itself is untouched


@pytest.mark.parametrize("item, words", [
    ("model.chanels=3", ["unknown config key 'model.chanels'", "model.channels"]),
    ("model.channels=abc", ["cannot parse", "int"]),
    ("model.attention=maybe", ["cannot parse"]),
    ("channels", ["key=value"]),
    ("model=3", ["is a section"]),
])
def test_bad_overrides_name_the_problem(item, words):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [item])
    for w in words:
        assert w in str(err.value)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="Available presets: small, large"):
        get_preset(PRESETS, "smal")


def test_command_line_reports_config_errors_and_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_command_line(PRESETS, ["--preset", "huge"], prog="x", description="d", default_preset="small")
    assert e.value.code == 2 and "unknown preset 'huge'" in capsys.readouterr().err
    cfg, args = parse_command_line(PRESETS, ["--preset", "large", "--set", "train.num_steps=7"], prog="x",
                                   description="d", default_preset="small")
    assert cfg.model.channels == 128 and cfg.train.num_steps == 7


def test_help_lists_presets_and_keys(capsys):
    with pytest.raises(SystemExit):
        parse_command_line(PRESETS, ["--help"], prog="x", description="d", default_preset="small")
    out = capsys.readouterr().out
    assert "small        A small preset." in out and "model.ch_mult = (1, 2, 2)" in out
