"""One client tool, `weather(city)`, in each dialect's shape: what the dialect tests offer a model."""

from __future__ import annotations

from typing import Any

CITY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
DESCRIPTION = "Weather for a city"

ANTHROPIC_TOOLS: list[dict[str, Any]] = [{"name": "weather", "description": DESCRIPTION, "input_schema": CITY_SCHEMA}]
RESPONSES_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "name": "weather", "description": DESCRIPTION, "parameters": CITY_SCHEMA}
]
CHAT_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "weather", "description": DESCRIPTION, "parameters": CITY_SCHEMA}}
]
