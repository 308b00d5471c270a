"""Exact checks of what we emit against the official SDKs' own types.

The SDKs parse leniently (unknown fields are kept, missing ones tolerated by their streaming
accumulators), so "the SDK did not crash" is not enough. `assert_exact` validates strictly and
then demands that every field we sent is one the type declares, recursively.
"""

from __future__ import annotations

from typing import Any

import pydantic
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.responses import Response, ResponseStreamEvent

_ADAPTERS: dict[Any, pydantic.TypeAdapter[Any]] = {}


def _adapter(type_: Any) -> pydantic.TypeAdapter[Any]:
    if type_ not in _ADAPTERS:
        _ADAPTERS[type_] = pydantic.TypeAdapter(type_)
    return _ADAPTERS[type_]


def _extras(value: Any, path: str = "") -> list[str]:
    """Paths of fields that landed in a model's `extra`: fields the type does not declare."""
    found: list[str] = []
    if isinstance(value, pydantic.BaseModel):
        found += [f"{path}.{name}" for name in (value.model_extra or {})]
        for name in type(value).model_fields:
            found += _extras(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _extras(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            found += _extras(item, f"{path}.{key}")
    return found


def assert_exact(type_: Any, data: dict[str, Any]) -> Any:
    """Validate `data` as `type_` strictly; fail on any field the type does not know."""
    parsed = _adapter(type_).validate_python(data, strict=True)
    extras = _extras(parsed)
    assert not extras, f"fields the SDK's type does not declare: {extras} in {data}"
    return parsed


def assert_anthropic_event(name: str, data: dict[str, Any]) -> None:
    assert data["type"] == name, (name, data)
    if name in ("ping", "error"):
        assert (data == {"type": "ping"}) if name == "ping" else set(data) == {"type", "error"}
        return
    assert_exact(RawMessageStreamEvent, data)


def assert_anthropic_message(data: dict[str, Any]) -> Message:
    return assert_exact(Message, data)


def assert_responses_event(name: str, data: dict[str, Any]) -> None:
    assert data["type"] == name, (name, data)
    assert_exact(ResponseStreamEvent, data)


def assert_response(data: dict[str, Any]) -> Response:
    return assert_exact(Response, data)
