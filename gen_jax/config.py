"""Typed, frozen configs with named presets and `--set key=value` overrides.

A paper defines its config as nested frozen dataclasses and a dict of presets (name -> zero-argument
factory). A launcher calls `parse_command_line(presets, argv)`:

    python -m experiments.ddpm --preset mnist --set train.num_steps=2000 --set model.ch_mult=1,2,2

`--help` lists the presets (each preset's docstring says what it is for) and every key with its type and
default. Unknown presets and keys fail with a `ConfigError` that lists the valid ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import textwrap
import types
import typing
from typing import Any, Callable, Mapping, Sequence

from gen_jax.errors import ConfigError

__all__ = ["TrainConfig", "ImageDataConfig", "parse_command_line", "apply_overrides", "override",
           "get_preset", "build_parser", "flat_items", "describe", "to_dict"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the shared training loop (`gen_jax.train.loop.train`)."""

    num_steps: int = 1000
    batch_size: int = 128  # global batch over all devices and processes
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    grad_clip_norm: float | None = 1.0
    weight_decay: float = 0.0
    ema_decay: float | None = 0.999
    grad_accum_steps: int = 1
    steps_per_call: int = 1  # train steps fused into one compiled call by lax.scan
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    compute_dtype: str = "float32"  # "float32" or "bfloat16"; params and optimizer state stay float32
    prefetch: int = 2
    # False: compile the train step with XLA:CPU's YNNPACK fusions off (faster for small transformers on
    # the CPU; ignored on other backends). See gen_jax.train.xla_options.
    cpu_ynn_fusions: bool = True


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    """Which images a paper trains on (`gen_jax.data.load_images`) and at what size."""

    source: str = "mnist"  # "mnist" (offline) or "tfds:<name>" (e.g. tfds:cifar10)
    data_dir: str | None = None  # tensorflow-datasets data_dir for prepared data
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 28
    channels: int = 1


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse `text` as a value of the annotated type `tp`."""
    tp, optional = _strip_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is tuple:
            args = typing.get_args(tp)
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip() != ""]
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_parse_value(p.strip(), args[0], key) for p in parts)
            if len(parts) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(_parse_value(p.strip(), a, key) for p, a in zip(parts, args))
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            if text not in choices:
                raise ValueError(f"choose one of {choices}")
            return text
    except ValueError as e:
        raise ConfigError(f"--set {key}={text!r}: cannot parse as {_type_name(tp)} ({e})") from None
    raise ConfigError(f"--set {key}: fields of type {_type_name(tp)} cannot be set from the command line")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _resolved_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def flat_items(config: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """All leaf settings as (dotted key, type, value)."""
    out = []
    for name, tp in _resolved_fields(type(config)).items():
        value = getattr(config, name)
        if dataclasses.is_dataclass(value):
            out.extend(flat_items(value, f"{prefix}{name}."))
        else:
            out.append((f"{prefix}{name}", tp, value))
    return out


def override(config: Any, key: str, text: str, _prefix: str = "") -> Any:
    """Return a copy of `config` with the dotted `key` set from the string `text`."""
    head, _, rest = key.partition(".")
    fields = _resolved_fields(type(config))
    full = _prefix + key
    if head not in fields:
        valid = [_prefix + k for k, _, _ in flat_items(config)]
        close = difflib.get_close_matches(full, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key {full!r}.{hint} Valid keys: {', '.join(valid)}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {_prefix + head!r} is a {_type_name(fields[head])}, not a section; "
                              f"use --set {_prefix + head}=VALUE")
        return dataclasses.replace(config, **{head: override(current, rest, text, f"{_prefix}{head}.")})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{full!r} is a section; set one of its keys, e.g. --set {full}."
                          f"{flat_items(current)[0][0]}=...")
    return dataclasses.replace(config, **{head: _parse_value(text, fields[head], full)})


def apply_overrides(config: Any, assignments: Sequence[str]) -> Any:
    """Apply `key=value` strings in order (see `override`), then run the config's `validate()` if it has one."""
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.num_steps=100)")
        key, text = item.split("=", 1)
        config = override(config, key.strip(), text)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def to_dict(config: Any) -> dict:
    """A JSON-ready nested dict of a config (tuples become lists, other values strings)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def describe(config: Any) -> str:
    """One line per setting, `key = value  (type)`, as `--help` lists them."""
    return "\n".join(f"  {k} = {v!r}  ({_type_name(_strip_optional(t)[0])}"
                     f"{' or None' if _strip_optional(t)[1] else ''})" for k, t, v in flat_items(config))


def get_preset(presets: Mapping[str, Callable[[], Any]], name: str) -> Any:
    """Build the preset `name`; a `ConfigError` naming the available presets otherwise."""
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Available presets: {', '.join(presets)}")
    return presets[name]()


def build_parser(presets: Mapping[str, Callable[[], Any]], *, prog: str, description: str,
                 default_preset: str) -> argparse.ArgumentParser:
    """The launchers' argument parser: --preset, --set, --workdir and the multi-process flags; --help lists
    every preset (its docstring's first paragraph) and every setting of the default preset."""
    lines = [description, "", "presets:"]
    for name, factory in presets.items():
        paragraph = " ".join((factory.__doc__ or "").strip().split("\n\n")[0].split())
        wrapped = textwrap.wrap(paragraph, 100, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15)
        lines.extend(wrapped or [f"  {name}"])
    lines += ["", f"settings of the default preset ({default_preset}); change any with --set key=value:",
              describe(presets[default_preset]())]
    parser = argparse.ArgumentParser(prog=prog, description="\n".join(lines),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset, help=f"named preset (default {default_preset})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting; repeatable")
    parser.add_argument("--workdir", default=None,
                        help="where checkpoints, metrics and pictures go; an existing run there is resumed")
    parser.add_argument("--coordinator", default=None,
                        help="host:port of process 0 for multi-process runs (jax.distributed)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    return parser


def parse_command_line(presets: Mapping[str, Callable[[], Any]], argv: Sequence[str] | None = None, *,
                       prog: str, description: str, default_preset: str):
    """Parse argv into (config, args). Config errors exit with the message (status 2)."""
    parser = build_parser(presets, prog=prog, description=description, default_preset=default_preset)
    args = parser.parse_args(argv)
    try:
        config = apply_overrides(get_preset(presets, args.preset), args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    return config, args
