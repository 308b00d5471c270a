"""`neuron.toml`: listen address, models to load at start, admission limits, devices, safety.

Every key can be overridden from the environment with the `NEURON_` prefix, `__` descending into
tables: `NEURON_LISTEN=0.0.0.0:13131`, `NEURON_ADMISSION__MAX_IN_FLIGHT=8`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cortex.core.secrets import is_loopback, resolve_secret
from cortex.core.settings import load_settings
from cortex.neuron.default_model import DEFAULT_MODEL_ID

DEFAULT_PORT = 13131


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdmissionLimits(_Strict):
    # None: as many sequences as the model's KV cache holds (they decode in one batch); a number caps it.
    max_in_flight: int | None = Field(default=None, ge=1)
    max_queue_depth: int = Field(default=64, ge=0)
    max_wait_secs: float = Field(default=30.0, gt=0)


class AdmissionOverride(_Strict):
    max_in_flight: int | None = Field(default=None, ge=1)
    max_queue_depth: int | None = Field(default=None, ge=0)
    max_wait_secs: float | None = Field(default=None, gt=0)


class AdmissionConfig(AdmissionLimits):
    # Per-model overrides: [admission.models."org/name"] max_in_flight = 2
    models: dict[str, AdmissionOverride] = Field(default_factory=dict)

    def limits_for(self, model_id: str) -> AdmissionLimits:
        base = AdmissionLimits(
            max_in_flight=self.max_in_flight, max_queue_depth=self.max_queue_depth, max_wait_secs=self.max_wait_secs
        )
        override = self.models.get(model_id)
        if override is None:
            return base
        return base.model_copy(update=override.model_dump(exclude_none=True))


class ModelConfig(_Strict):
    """A model to load: what `default_models` lists and what `POST /models/load` accepts."""

    model_id: str = Field(min_length=1)
    source: str | None = None  # hub id, local safetensors dir, or .gguf path; default: model_id
    harness: Literal["transformers"] = "transformers"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    quant: str | None = None
    devices: list[int] | None = None
    context_length: int | None = Field(default=None, ge=16)
    revision: str | None = None


class DevicesConfig(_Strict):
    # "auto": every CUDA device NVML/torch sees, else the CPU. Or explicit CUDA indices, or "cpu".
    use: Literal["auto", "cpu"] | list[int] = "auto"
    # The CPU "device" budget for model memory, as a share of host RAM or an absolute size.
    cpu_memory_fraction: float = Field(default=0.5, gt=0, le=1)
    cpu_memory_mb: int | None = Field(default=None, ge=1)


class EngineConfig(_Strict):
    """[engine]: how the engine uses this host's CPUs and GPUs (the neuron's threads: cortex/neuron/threads.py)."""

    # torch intra-op threads; default: OMP_NUM_THREADS if set, else the cores it may use less one.
    threads: int | None = Field(default=None, ge=1)
    interop_threads: int | None = Field(default=None, ge=1)  # default 1
    # The cores this neuron counts as its own (`cortex up` passes each neuron its share); default: all usable.
    cores: int | None = Field(default=None, ge=1)
    # Decode from captured CUDA graphs on CUDA devices; false runs eager (for debugging).
    cuda_graphs: bool = True
    # float32 models on CPU: projections on oneDNN with weights packed once at load (faster than the
    # BLAS path, and batch-invariant); false keeps torch's F.linear.
    cpu_onednn: bool = True
    # CPU models: steps through torch.compile, compiled at load (a minute or more the first time,
    # seconds once inductor's disk cache has the architecture); faster single-stream decode.
    cpu_compile: bool = False
    # CUDA models: each decoder layer through torch.compile (one graph for all of them) before the decode
    # graphs are captured, so a replay runs fused kernels; adds the compile to the load.
    cuda_compile: bool = False
    # Each model's paged KV pool on a GPU: this share of the memory free once its weights are loaded,
    # at most kv_memory_max_mb (co-resident models must still fit; /models reports the pool's bytes).
    kv_memory_fraction: float = Field(default=0.5, gt=0, le=0.95)
    kv_memory_max_mb: int = Field(default=32768, ge=16)


class NeuronConfig(_Strict):
    # Loopback by default: another address needs a `token` (check_exposure), so nobody gets in uninvited.
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    # None (key absent): load the embedded default model. [] loads nothing.
    default_models: list[ModelConfig] | None = None
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    cache_dir: Path | None = None  # Hugging Face cache; default: HF_HUB_CACHE / ~/.cache/huggingface
    # GGUF models are dequantized once and kept here as safetensors (several times the GGUF's size), so
    # later loads take seconds: "auto" is $XDG_CACHE_HOME/cortex/gguf (~/.cache/cortex/gguf), "off" converts
    # at every load, anything else is a directory.
    gguf_cache: str = "auto"
    # Local sources must resolve under one of these roots (besides installed model packages).
    model_roots: list[Path] = Field(default_factory=list)
    allow_pickle: bool = False  # allow .bin/.pt checkpoints (runs pickle: only for trusted files)
    # Every route but /health and /version needs `Authorization: Bearer <token>` when set: the value, its
    # `sha256:<hex>`, `env:NAME` or `file:PATH` (core/secrets.py). Required to listen beyond loopback.
    token: str | None = None
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    drain_timeout_s: float = Field(default=30.0, ge=0)  # on SIGTERM: how long in-flight requests may finish
    stream_keepalive_s: float = Field(default=5.0, gt=0)  # a stream's SSE comments until its first output
    fault_injection: bool = False  # enables POST /admin/fault (tests only)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return resolve_secret(v) if v is not None else None

    @field_validator("listen")
    @classmethod
    def _listen_host_port(cls, v: str) -> str:
        parse_listen(v)
        return v

    def gguf_cache_dir(self) -> Path | None:
        if self.gguf_cache == "off":
            return None
        if self.gguf_cache == "auto":
            return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cortex" / "gguf"
        return Path(self.gguf_cache).expanduser()

    def models_to_load(self) -> list[ModelConfig]:
        if self.default_models is None:
            return [ModelConfig(model_id=DEFAULT_MODEL_ID)]
        return self.default_models


def check_exposure(config: NeuronConfig) -> None:
    """Refuse to listen beyond loopback without a token: loading, unloading and inference would be open to all."""
    host, _ = parse_listen(config.listen)
    if config.token is None and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {config.listen} (reachable from the network) without a token: set token in "
            "neuron.toml (or NEURON_TOKEN, e.g. env:NAME or file:PATH) and give it to the gateway, or listen on "
            "127.0.0.1"
        )


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{value}' is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def load_neuron_config(path: Path | None) -> NeuronConfig:
    return load_settings(NeuronConfig, path, "NEURON_")
