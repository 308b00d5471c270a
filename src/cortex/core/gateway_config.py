"""`cortex.toml`: where the gateway listens, which neurons it fronts, how it polls, loads and evicts.

```toml
models_config = "models.toml"      # relative to this file
[gateway]
listen = "127.0.0.1:31313"         # the default; another address needs api_keys (or allow_anonymous)
metrics_listen = "127.0.0.1:31314"
api_keys = ["sha256:<hex>", "env:GATEWAY_API_KEY"]   # docs/reliability.md: how keys are given
admin_key = "file:/run/secrets/cortex-admin"
neuron_token = "env:FLEET_TOKEN"   # sent to every neuron without a token of its own
[eviction]
strategy = "lru"                   # lru | priority
defrag_after_cycles = 50
min_residency_s = 60
[[neurons]]
name = "beast"
endpoint = "http://beast.internal:13131"
```

Every key can be overridden from the environment with the `CORTEX_` prefix, `__` descending into
tables (`CORTEX_GATEWAY__LISTEN=127.0.0.1:8080`, `CORTEX_NEURONS='[{"name": "a", "endpoint": "…"}]'`).
Every problem is reported naming the file, the key and what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cortex.core.catalogue import Catalogue, check_catalogue, load_catalogue
from cortex.core.secrets import KeySet, is_loopback, read_key_file, resolve_secret
from cortex.core.settings import ConfigError, load_settings

DEFAULT_PORT = 31313
DEFAULT_METRICS_PORT = 31314
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets) → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{value}' is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _sendable_secret(value: str | None) -> str | None:
    """A credential the gateway sends (a neuron token): `env:`/`file:` resolved; a digest cannot be sent."""
    if value is None:
        return None
    if value.startswith("sha256:"):
        raise ValueError("the gateway sends this token, so it needs the token itself (or env:/file:), not a hash")
    return resolve_secret(value)


class ClientKey(_Strict):
    """A client key with its own limits (`[[gateway.client_keys]]`); it opens client routes like api_keys."""

    key: str  # the value, sha256:<hex>, env:NAME or file:PATH
    requests_per_minute: int | None = Field(default=None, ge=1)  # else gateway.requests_per_minute
    tokens_per_minute: int | None = Field(default=None, ge=1)  # prompt + completion; else gateway.tokens_per_minute
    models: list[str] | None = None  # the model ids (or aliases) it may use; None: all

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return resolve_secret(v)


class GatewaySection(_Strict):
    # Loopback by default: serving the network is a decision (api_keys, or allow_anonymous).
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    metrics_listen: str | None = f"127.0.0.1:{DEFAULT_METRICS_PORT}"  # None: no metrics listener
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)  # larger request bodies get 413
    # Credentials: the value, `sha256:<hex>` of it (checked keys only), `env:NAME` or `file:PATH` (core/secrets.py).
    admin_key: str | None = None  # /admin/* needs `Authorization: Bearer <admin_key>`; never a client key
    api_keys: list[str] = Field(default_factory=list)  # when set, client routes need one of these
    api_keys_file: Path | None = None  # more client keys, one per line (plain or sha256:), '#' comments
    allow_anonymous: bool = False  # serve clients without keys on a non-loopback listen (logged loudly)
    neuron_token: str | None = None  # bearer token sent to every neuron that has no `token` of its own
    metrics_key: str | None = None  # when set, /metrics needs `Authorization: Bearer` it (or the admin key)
    client_keys: list[ClientKey] = Field(default_factory=list)  # keys with their own limits / model allow-list
    # Limits of every client key without its own, over a sliding minute (429 + Retry-After); None: unlimited.
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    keepalive_interval_s: float = Field(default=5.0, gt=0)  # SSE comments to streams waiting on a cold load
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # A neuron that stops answering (docs/reliability.md): a stream silent this long (first byte included)
    # ends with an error event; a non-streamed answer (sent whole when generation ends) gets this long.
    stream_idle_timeout_s: float = Field(default=120.0, gt=0)
    first_byte_timeout_s: float = Field(default=600.0, gt=0)
    # A client that stops reading its stream is cut off once a write has waited this long (nothing stays pinned).
    client_write_timeout_s: float = Field(default=30.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)  # on SIGTERM: how long in-flight requests may finish
    retry_after_s: float = Field(default=10.0, gt=0)  # Retry-After for recovering models and a full fleet
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v

    @field_validator("admin_key", "metrics_key")
    @classmethod
    def _admin_key(cls, v: str | None) -> str | None:
        return resolve_secret(v) if v is not None else None

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: list[str]) -> list[str]:
        return [resolve_secret(key) for key in v]

    @field_validator("neuron_token")
    @classmethod
    def _neuron_token(cls, v: str | None) -> str | None:
        return _sendable_secret(v)

    @model_validator(mode="after")
    def _keys(self) -> GatewaySection:
        if self.api_keys_file is not None:
            self.api_keys = [*self.api_keys, *read_key_file(self.api_keys_file)]
            self.api_keys_file = None  # read once: the keys are in api_keys now
        self.api_keys = [*self.api_keys, *(k.key for k in self.client_keys if k.key not in self.api_keys)]
        if self.admin_key is not None and KeySet([self.admin_key]).overlaps(KeySet(self.api_keys)):
            raise ValueError("admin_key must differ from every client key in api_keys")
        return self

    def client_key_set(self) -> KeySet:
        return KeySet(self.api_keys)


class PollSection(_Strict):
    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=5.0, gt=0)
    unhealthy_after: int = Field(default=3, ge=1)  # consecutive failed polls before a node is unhealthy


class EvictionSection(_Strict):
    strategy: Literal["lru", "priority"] = "lru"
    # After this many load/unload cycles on a neuron, ask it to defragment device memory; 0 = never.
    defrag_after_cycles: int = Field(default=50, ge=0)
    # A model loaded less than this long ago is never evicted: two models fighting over one GPU must not thrash.
    min_residency_s: float = Field(default=60.0, ge=0)


class LoadSection(_Strict):
    timeout_s: float = Field(default=900.0, gt=0)  # a cold load can take minutes: never cut it short by default
    poll_interval_s: float = Field(default=0.25, gt=0)  # how often a running load's progress is read
    preload_pinned: bool = True  # load models on the nodes they are pinned on as soon as those nodes answer


class NeuronEntry(_Strict):
    name: str
    endpoint: str
    token: str | None = None  # the neuron's token, sent as a bearer token on every call (else gateway.neuron_token)

    @field_validator("token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return _sendable_secret(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NODE_NAME.match(v):
            raise ValueError("must be letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"'{v}' is not an http(s):// URL")
        return v.rstrip("/")


class GatewayConfig(_Strict):
    models_config: Path | None = None  # None: no catalogue, only models the neurons already serve
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    poll: PollSection = Field(default_factory=PollSection)
    eviction: EvictionSection = Field(default_factory=EvictionSection)
    load: LoadSection = Field(default_factory=LoadSection)
    neurons: list[NeuronEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _default_neuron_token(self) -> GatewayConfig:
        if self.gateway.neuron_token is not None:
            for neuron in self.neurons:
                if neuron.token is None:
                    neuron.token = self.gateway.neuron_token
        return self


@dataclass(frozen=True)
class FleetConfig:
    """Everything the gateway is configured with: cortex.toml plus the catalogue it names."""

    gateway: GatewayConfig
    catalogue: Catalogue
    source: str  # the config file, for messages


def check_neurons(config: GatewayConfig, source: str) -> None:
    problems: list[str] = []
    names: set[str] = set()
    endpoints: set[str] = set()
    for index, neuron in enumerate(config.neurons):
        if neuron.name in names:
            problems.append(f"{source}: key 'neurons.{index}.name': duplicate neuron name '{neuron.name}'")
        if neuron.endpoint in endpoints:
            problems.append(f"{source}: key 'neurons.{index}.endpoint': '{neuron.endpoint}' is listed twice")
        names.add(neuron.name)
        endpoints.add(neuron.endpoint)
    if problems:
        raise ConfigError("\n".join(problems))


def check_exposure(config: GatewayConfig, source: str) -> None:
    """Refuse to serve the network with no client keys unless `allow_anonymous` says so on purpose."""
    section = config.gateway
    host, _ = parse_listen(section.listen)
    if is_loopback(host) or section.api_keys or section.allow_anonymous:
        return
    raise ConfigError(
        f"{source}: key 'gateway.listen': refusing to serve {section.listen} (reachable from the network) "
        "without client keys: set gateway.api_keys (or api_keys_file), or gateway.allow_anonymous = true to "
        "serve anyone, or listen on 127.0.0.1"
    )


def exposure_warnings(config: GatewayConfig) -> list[str]:
    """What the gateway should log loudly at start: the network served without keys, metrics unprotected."""
    section = config.gateway
    warnings = []
    if not is_loopback(parse_listen(section.listen)[0]) and not section.api_keys:
        warnings.append(f"gateway.allow_anonymous: serving {section.listen} to anyone, without client keys")
    return warnings


def load_fleet_config(path: Path | None, environ: Mapping[str, str] | None = None) -> FleetConfig:
    """Read and validate cortex.toml (with CORTEX_* overrides) and the models.toml it names."""
    config = load_settings(GatewayConfig, path, "CORTEX_", environ)
    source = str(path) if path is not None else "(defaults)"
    check_neurons(config, source)
    check_exposure(config, source)
    names = {n.name for n in config.neurons}
    if config.models_config is None:
        return FleetConfig(config, Catalogue(), source)
    models_path = config.models_config
    if not models_path.is_absolute() and path is not None:
        models_path = path.parent / models_path
    if not models_path.is_file():
        raise ConfigError(f"{source}: key 'models_config': {models_path} is not a file")
    return FleetConfig(config, load_catalogue(models_path, names), source)


def fleet_config_from(config: GatewayConfig, catalogue: Catalogue) -> FleetConfig:
    """A FleetConfig built in code (e.g. by `cortex up`), checked like one read from files."""
    check_neurons(config, "(built-in)")
    check_exposure(config, "(built-in)")
    check_catalogue(catalogue, "(built-in catalogue)", {n.name for n in config.neurons})
    return FleetConfig(config, catalogue, "(built-in)")
