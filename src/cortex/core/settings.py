"""TOML configuration with environment overrides, validated by pydantic.

`load_settings(Model, path, env_prefix="NEURON_")` reads the file (if any), applies overrides
such as `NEURON_ADMISSION__MAX_IN_FLIGHT=4` (double underscore descends into a table; values are
parsed as JSON when they parse, else taken as strings), and validates. Every failure raises
`ConfigError` naming the file, the key and the problem.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def env_overrides(prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Nested dict of the overrides found in the environment under `prefix`."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(prefix) or name == prefix:
            continue
        path = [part.lower() for part in name[len(prefix) :].split("__")]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = _parse_env_value(raw)
    return out


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def describe_validation_error(source: str, exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        hint = _unknown_key_hint(model, err["loc"]) if model is not None and err["type"] == "extra_forbidden" else ""
        lines.append(f"{source}: key '{key}': {err['msg']}{hint}")
    return "\n".join(lines)


def _unknown_key_hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """A "did you mean" for a misspelt key, or where a known key belongs (TOML puts keys after a header in it)."""
    name = str(loc[-1])
    table: type[BaseModel] | None = model
    for part in loc[:-1]:
        if table is None:
            return ""
        field = table.model_fields.get(str(part))
        if field is not None:  # a list index or a dict key (admission.models."ID") keeps the table
            table = _model_inside(field.annotation)
    if len(loc) > 1 and name in model.model_fields:
        return f" ('{name}' is a top-level key: in TOML, put it before the first [table] header)"
    if table is None:
        return ""
    close = difflib.get_close_matches(name, list(table.model_fields), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_inside(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds, through Optional, list and dict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_inside(arg)
        if found is not None:
            return found
    return None


def validate_settings(model: type[M], data: dict[str, Any], source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(source, exc, model)) from None


def load_settings(model: type[M], path: Path | None, env_prefix: str, environ: Mapping[str, str] | None = None) -> M:
    data = read_toml(path) if path is not None else {}
    overrides = env_overrides(env_prefix, environ)
    source = str(path) if path is not None else "(defaults)"
    if overrides:
        source += f" + {env_prefix}* environment"
    return validate_settings(model, deep_merge(data, overrides), source)
