"""The neuron's control API as typed bodies: the one contract between a neuron and the gateway.

The neuron builds its answers from these types; the gateway parses what it polls with them; the
test fake neuron speaks them too. docs/neuron-api.md describes the routes one by one.

Every body ignores fields it does not know and keeps them when it passes them on (`extra="allow"`):
a newer neuron may report more than an older gateway reads, and neither breaks. Numbers a neuron
may leave out default to what the gateway assumed before it had them (0, None).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelStatus(StrEnum):
    """Where a model is in its life on a neuron (docs/neuron-api.md, "Model states").

    loading → loaded → unloading (→ gone); loaded → poisoned → recovering → loaded; a load that
    fails leaves `failed` with its reason until the next attempt.
    """

    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    POISONED = "poisoned"
    RECOVERING = "recovering"
    FAILED = "failed"


# A poisoned model is being recovered by its neuron: both mean "come back shortly".
RECOVERY_STATUSES = frozenset({ModelStatus.POISONED, ModelStatus.RECOVERING})


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- GET /discovery ------------------------------------------------------------------------------
class DiscoveryDevice(_Body):
    index: int
    kind: str = "cuda"  # "cuda" | "cpu"
    name: str | None = None
    vram_total_mb: int = 0
    compute_capability: str | None = None


class Discovery(_Body):
    """What a neuron is: read when a gateway first reaches it and whenever it comes back."""

    hostname: str | None = None
    os: str | None = None
    kernel: str | None = None
    arch: str | None = None
    cpu: str | None = None
    cpu_count: int | None = None
    ram_total_mb: int | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    cuda_available: bool | None = None
    cuda_reason: str | None = None
    devices: list[DiscoveryDevice] = Field(default_factory=list)
    harnesses: list[str] = Field(default_factory=list)


# ---- GET /health ---------------------------------------------------------------------------------
class DeviceHealth(_Body):
    index: int
    kind: str | None = None
    vram_total_mb: int | None = None
    vram_used_mb: int | None = None
    vram_free_mb: int | None = None
    utilization_pct: float | None = None
    temp_c: float | None = None
    process_rss_mb: int | None = None  # CPU neurons only


class ModelHealth(_Body):
    """A model's admission counters: `in_flight` and `queue_depth` count every gateway's requests."""

    id: str
    status: ModelStatus
    in_flight: int = 0
    queue_depth: int = 0
    max_in_flight: int | None = None
    max_queue_depth: int | None = None
    admitted: int = 0
    rejected_queue_full: int = 0
    rejected_timeout: int = 0
    tok_s_decode: float = 0.0
    faults: int = 0


class Health(_Body):
    status: str = "ok"
    uptime_s: float = 0.0
    devices: list[DeviceHealth] = Field(default_factory=list)
    models: list[ModelHealth] = Field(default_factory=list)


# ---- GET /models ---------------------------------------------------------------------------------
class LoadProgress(_Body):
    fraction: float | None = None  # 0..1
    stage: str | None = None


class ModelError(_Body):
    reason: str | None = None  # e.g. "out_of_memory", "missing_files", "device_fault"
    message: str | None = None

    def text(self) -> str:
        if self.reason and self.message:
            return f"{self.reason}: {self.message}"
        return str(self.message or self.reason or "")


class ModelLimit(_Body):
    context: int | None = None  # tokens, prompt and completion together


class KvStats(_Body):
    """The paged KV cache of a loaded model (engines that have one report it)."""

    block_size: int | None = None  # tokens per block
    blocks_total: int | None = None
    blocks_used: int | None = None
    blocks_cached: int | None = None  # free blocks still holding a reusable prompt prefix
    tokens_capacity: int | None = None


class ModelEntry(_Body):
    """One model a neuron holds, whatever its status: an element of `GET /models`."""

    id: str
    status: ModelStatus
    harness: str | None = None
    devices: list[int] = Field(default_factory=list)
    device_kind: str | None = None
    vram_used_mb: int = 0
    limit: ModelLimit = Field(default_factory=ModelLimit)
    tool_call: bool = False  # whether the chat template renders tools (so tool calls are parsed)
    tool_call_format: str | None = None
    architecture: str | None = None
    dtype: str | None = None
    source: str | None = None
    loaded_at: float | None = None  # wall clock, seconds since the epoch
    last_used: float | None = None  # wall clock
    load_seconds: float | None = None
    load_progress: LoadProgress | float | None = None  # while loading or recovering
    error: ModelError | str | None = None  # why it failed or was poisoned
    kv: KvStats | None = None

    def progress(self) -> tuple[float | None, str | None]:
        """(fraction 0..1, stage): older neurons report a bare number."""
        if isinstance(self.load_progress, LoadProgress):
            return self.load_progress.fraction, self.load_progress.stage
        return self.load_progress, None

    def error_text(self) -> str | None:
        if self.error is None:
            return None
        return self.error.text() if isinstance(self.error, ModelError) else str(self.error)


def parse_models(raw: Any) -> list[ModelEntry]:
    """`GET /models` as entries; an element that is not a model is skipped, not fatal."""
    if not isinstance(raw, list):
        return []
    entries = []
    for item in raw:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            entries.append(ModelEntry.model_validate(item))
    return entries


# ---- POST /models/load, /models/unload -----------------------------------------------------------
class LoadRequest(_Body):
    """What a gateway asks a neuron to load; absent fields are the neuron's to choose."""

    model_id: str = Field(min_length=1)
    source: str | None = None  # hub id, local safetensors dir, or .gguf path; default: model_id
    harness: str | None = None
    dtype: str | None = None
    quant: str | None = None
    devices: list[int] | None = None
    context_length: int | None = None
    revision: str | None = None


class UnloadRequest(BaseModel):
    model_id: str


class Unloaded(_Body):
    model_id: str
    freed_mb: int = 0


# ---- GET /models/{id}/endpoint -------------------------------------------------------------------
class ModelEndpoint(_Body):
    model_id: str
    base_url: str
    chat_completions: str
    completions: str


# ---- POST /v1/chat/tokenize ----------------------------------------------------------------------
class TokenCount(_Body):
    """Prompt tokens of a chat request (an OpenAI chat body), by the model's own tokenizer and template."""

    model: str
    prompt_tokens: int


# ---- /admin/* ------------------------------------------------------------------------------------
class Defragmented(_Body):
    devices: list[dict[str, Any]] = Field(default_factory=list)  # per device: {device, before, after}


class FaultRequest(BaseModel):
    """Test hook (`fault_injection = true`): the model's next `count` forwards raise a device fault."""

    model_id: str
    count: int = 1


class FaultArmed(_Body):
    model_id: str
    faults_armed: int
