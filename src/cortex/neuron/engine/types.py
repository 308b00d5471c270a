"""The engine's contract with the rest of the neuron.

The neuron's HTTP layer renders a prompt to token ids, builds a `GenerationRequest`, and consumes
the async stream of `TextDelta` / `Finished` events from `ModelScheduler.generate`. Everything
that touches torch happens behind this contract, on the device's worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class EngineError(Exception):
    """A request the engine cannot serve (bad parameters): the client's fault, never poisons."""


class DeviceFault(Exception):
    """A fault during a forward (CUDA error, OOM mid-step): poisons the model, not the process."""


class LoadError(Exception):
    """A model that cannot be loaded; `reason` is one of the short codes below, message is for humans."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "missing_files" | "out_of_memory" | "unsupported_architecture" | "forbidden" | "error"


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from. Exactly one of hub id / local dir / gguf file, resolved by the loader."""

    kind: Literal["hub", "local", "gguf"]
    location: str  # hub repo id, directory path, or path to a .gguf file
    revision: str | None = None
    gguf_file: str | None = None  # for hub repos that hold GGUF files


@dataclass(frozen=True)
class LoadSpec:
    model_id: str
    source: ModelSource
    dtype: str | None = None  # "float32" | "bfloat16" | "float16" | None (model default / float32 on CPU)
    device: str = "cpu"  # "cpu" or "cuda:N"
    context_length: int | None = None  # cap on the model's own limit
    cache_dir: Path | None = None
    gguf_cache_dir: Path | None = None  # where converted GGUFs are kept (gguf_cache.py); None: convert every load
    allow_pickle: bool = False  # .bin/.pt checkpoints only when the neuron's own config allows it


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past EOS (benchmarks); max_new_tokens still ends it
    json_object: bool = False  # constrain the output to one JSON object (response_format json_object)
    logprobs: int | None = None  # report each token's logprob and this many top alternatives (0-20); None: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    # A grammar.Grammar to decode under (JSON Schema, Lark, regex, tool calls); validation compiles it
    # for the model (a grammar that does not compile is an EngineError) and leaves the CompiledGrammar here.
    constraint: Any = None


@dataclass(frozen=True)
class TextDelta:
    """New text, safe to show: never a partial UTF-8 character, never a prefix of a stop string."""

    text: str
    tokens: int  # tokens this delta accounts for
    logprobs: tuple[Any, ...] = ()  # one logprobs.TokenLogprob per token, when the request asked for them


@dataclass(frozen=True)
class Finished:
    reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None  # the stop string that ended generation, if one did
    time_to_first_token_s: float = 0.0
    decode_tok_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache (not recomputed)


GenerationEvent = TextDelta | Finished


@dataclass
class ModelInfo:
    """What the lifecycle layer reports about a loaded model."""

    model_id: str
    device: str
    context_length: int
    memory_bytes: int  # measured after load: CUDA allocation delta, or parameter+buffer bytes on CPU
    architecture: str
    dtype: str
    tool_call_format: str | None  # e.g. "hermes" when the chat template renders tools; None if it cannot
    chat_template: bool = True
    extra: dict[str, str] = field(default_factory=dict)


# Events of the output parsers (tool calls, reasoning). The HTTP layer feeds them generated text and
# streams what they return; each parser holds back only what might still turn out to be markup.


@dataclass(frozen=True)
class PlainText:
    """Text that is neither a tool call nor reasoning: safe to stream as content."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """A completed tool call, OpenAI-shaped: {"id", "type": "function", "function": {"name", "arguments"}}."""

    call: dict[str, Any]


@dataclass(frozen=True)
class ReasoningText:
    """Text inside the model's thinking block (`<think>...</think>`)."""

    text: str


ParsedEvent = PlainText | ToolCall
ReasoningEvent = PlainText | ReasoningText
