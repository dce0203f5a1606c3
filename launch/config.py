"""Load a YAML experiment into the typed dataclass tree, strictly.

Unknown keys get a did-you-mean, wrong types name the dotted field, and each dataclass's own
``__post_init__`` checks ranges. Every failure is a ``UserError`` (one line, exit code 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from selfrank.errors import UserError

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: config is not valid UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
    return data


# Settings a user may look for where they are not, with where the choice is made instead.
MOVED_SETTINGS = {
    "reward.loss": "the reward loss follows the variant (str: pairwise; list str_listwise in variants for "
                   "the listwise loss)",
    "sample.k": "renamed sample.samples_per_prompt (one name for answers per prompt in sample, ppo and eval)",
}


def build(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, recursing into nested dataclasses."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            if where in MOVED_SETTINGS:
                raise UserError(f"'{where}' is not a setting: {MOVED_SETTINGS[where]}")
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(fields))})"
            raise UserError(f"unknown setting '{where}'{hint}")
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        _check_finite(value, where)
        kwargs[name] = _coerce(hints[name], value, where)
    return cls(**kwargs)


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN and infinity anywhere (YAML's .nan / .inf, 1e999): no setting means them, and a NaN
    passes every range check (all comparisons with it are false)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {_kind(value)}")
        item = args[0] if args else Any
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {_kind(value)}")
        if len(args) == 2:
            return {_coerce(args[0], k, f"{where} (key {k!r})"): _coerce(args[1], v, f"{where}.{k}")
                    for k, v in value.items()}
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it when it parses as a number.
            if isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    pass
                else:
                    _check_finite(number, where)
                    return number
            raise UserError(f"{where}: expected a number, got {_kind(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            raise UserError(f"{where}: must be a finite number, got {value!r}"[:120]) from None
        _check_finite(number, where)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {_kind(value)}")
        return value
    return value


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def load_experiment(path: str | os.PathLike, overrides: list[str] | None = None):
    """Read an experiment YAML, apply ``key.sub=value`` overrides, and return an ExperimentConfig."""
    from selfrank.train.config import ExperimentConfig

    data = load_yaml(path)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected KEY=VALUE, e.g. ppo.steps=10")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return build(ExperimentConfig, data)
