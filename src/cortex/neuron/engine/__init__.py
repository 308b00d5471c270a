"""The in-process inference engine: device worker threads, one scheduler per model, sampling, chat, parsing.

The neuron's HTTP layer uses `Engine` to load models and `LoadedModel` to render prompts, generate,
and parse tool calls / reasoning out of the output. See docs/engine.md for the design.
"""

from .engine import Engine
from .memory import KVBudget
from .model import LoadedModel
from .reasoning import ReasoningParser
from .tools import ToolCallParser, parse_tool_calls
from .types import (
    DeviceFault,
    EngineError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    LoadError,
    LoadSpec,
    ModelInfo,
    ModelSource,
    ParsedEvent,
    PlainText,
    ReasoningEvent,
    ReasoningText,
    SamplingParams,
    TextDelta,
    ToolCall,
)

__all__ = [
    "DeviceFault",
    "Engine",
    "EngineError",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "KVBudget",
    "LoadError",
    "LoadSpec",
    "LoadedModel",
    "ModelInfo",
    "ModelSource",
    "ParsedEvent",
    "PlainText",
    "ReasoningEvent",
    "ReasoningParser",
    "ReasoningText",
    "SamplingParams",
    "TextDelta",
    "ToolCall",
    "ToolCallParser",
    "parse_tool_calls",
]
