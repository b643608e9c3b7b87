"""Loading typed configuration: YAML (a path or a shipped config name) plus ``--set a.b=c`` overrides into
dataclasses, unknown keys rejected, types and ``Literal`` choices checked with the field named."""
from __future__ import annotations

import dataclasses
import importlib.resources
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kB; anything over 1 MiB is refused
MAX_CONFIG_NODES = 100_000  # values after YAML alias expansion (an alias bomb expands to billions)


class ConfigError(ValueError):
    """A configuration field is missing, unknown or of the wrong type; the message names it."""


def _field_type(cls, name):
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {_short(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is str and value is None:  # `--set key=` (empty YAML value) clears a string field
        return ""
    if tp in (int, float, str):
        if isinstance(value, (list, tuple, dict)):  # never str() a (possibly alias-expanded) structure
            raise ConfigError(f"{where}: expected {tp.__name__}, got a {type(value).__name__}")
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {_short(value)}") from None
    return value


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_size(data, where: str) -> None:
    """Refuse a structure with more than MAX_CONFIG_NODES values (counted without expanding it all)."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} values (a YAML alias bomb?); refused")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(v, _field_type(cls, k), f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` strings (values parsed as YAML scalars) to a nested mapping."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. preprocess.height=256")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: not a valid YAML value ({str(e).splitlines()[0]})") from None
        _check_size(value, f"--set {key}")
        node[parts[-1]] = value
    return data


def shipped_configs():
    """The folder of the configs shipped with the package (``demo/``, ``msvcl/``, ``periodic_sampling/``)."""
    return importlib.resources.files("mammodg") / "configs"


def config_path(name: str | Path):
    """A config file by path, or else by its name among the shipped configs (``demo/contrastive.yaml``,
    also written ``configs/demo/contrastive.yaml``). A missing file is a ConfigError, never a default."""
    path = Path(name)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    if parts and not path.is_absolute():
        shipped = shipped_configs().joinpath(*parts)
        if shipped.is_file():
            return shipped
    raise ConfigError(f"config file not found: {name} (neither a file nor a shipped config; shipped: "
                      f"{', '.join(list_shipped_configs())})")


def list_shipped_configs() -> list[str]:
    return sorted(f"{d.name}/{f.name}" for d in shipped_configs().iterdir() if d.is_dir()
                  for f in d.iterdir() if f.name.endswith(".yaml"))


def default_config(stage: str):
    """The embedded default of ``mammodg train --stage S``: the shipped ``demo/<stage>.yaml``."""
    return config_path(f"demo/{stage}.yaml")


def load(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load dataclass ``cls`` from an optional YAML file (a path or a shipped config name) plus overrides."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = config_path(path)
        raw = path.read_bytes()
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {len(raw)} bytes, over the {MAX_CONFIG_BYTES}-byte limit for a config file")
        try:
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        where = str(path)
        _check_size(data, where)
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, where)


def save(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
