"""`models.toml`: the models the fleet may load, how big they are, where they belong, and aliases.

```toml
[[models]]
id = "qwen3-8b"
source = "Qwen/Qwen3-8B"        # hub id, local safetensors dir, or .gguf path (as the neuron sees it)
dtype = "bfloat16"
vram_mb = 17000                 # estimate; the measured size after a load replaces it in placement
min_devices = 1
min_device_vram_mb = 20000
pinned_on = ["beast"]           # never evicted there; preferred there
residency_priority = 10         # under strategy "priority", who may displace whom

[aliases]
fast = "qwen3-8b"
```

Hardware comes from the neurons' discovery, never from here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from cortex.core.neuron_api import LoadRequest
from cortex.core.settings import ConfigError, read_toml, validate_settings


class _Strict(BaseModel):
    # A misspelt key is an error naming it, never silently ignored.
    model_config = ConfigDict(extra="forbid")


class CatalogueModel(_Strict):
    id: str = Field(min_length=1)
    source: str | None = None  # None: the neuron resolves the id itself (e.g. as a hub id)
    harness: str | None = None
    dtype: str | None = None
    quant: str | None = None
    vram_mb: int | None = Field(default=None, gt=0)  # None: unknown until measured; placed as if it fits
    min_devices: int = Field(default=1, ge=1)
    min_device_vram_mb: int = Field(default=0, ge=0)
    pinned_on: list[str] = Field(default_factory=list)
    residency_priority: int = 0

    def load_request(self, devices: list[int] | None) -> LoadRequest:
        """The neuron `POST /models/load` body for this model (absent fields left to the neuron)."""
        return LoadRequest(
            model_id=self.id,
            source=self.source,
            harness=self.harness,
            dtype=self.dtype,
            quant=self.quant,
            devices=devices,
        )


class Catalogue(_Strict):
    models: list[CatalogueModel] = Field(default_factory=list)
    aliases: dict[str, str] = Field(default_factory=dict)
    _index: dict[str, CatalogueModel] | None = PrivateAttr(default=None)

    def get(self, model_id: str) -> CatalogueModel | None:
        return self._by_id().get(model_id)

    def resolve(self, name: str) -> str:
        """The model id a client name stands for: an alias's target, else the name itself."""
        return self.aliases.get(name, name)

    def ids(self) -> list[str]:
        return [m.id for m in self.models]

    def _by_id(self) -> dict[str, CatalogueModel]:
        if self._index is None:
            self._index = {m.id: m for m in self.models}
        return self._index


def check_catalogue(catalogue: Catalogue, source: str, neuron_names: set[str] | None = None) -> None:
    """Cross-field rules pydantic cannot see: unique ids, alias targets, known pinned nodes."""
    problems: list[str] = []
    seen: set[str] = set()
    for index, model in enumerate(catalogue.models):
        if model.id in seen:
            problems.append(f"{source}: key 'models.{index}.id': duplicate model id '{model.id}'")
        seen.add(model.id)
        if neuron_names is not None:
            for node in model.pinned_on:
                if node not in neuron_names:
                    known = ", ".join(sorted(neuron_names)) or "none configured"
                    problems.append(
                        f"{source}: key 'models.{index}.pinned_on': '{node}' is not a neuron in cortex.toml ({known})"
                    )
    for alias, target in catalogue.aliases.items():
        if alias in seen:
            problems.append(f"{source}: key 'aliases.{alias}': alias shadows a model id")
        if target not in seen:
            problems.append(f"{source}: key 'aliases.{alias}': target '{target}' is not a model id in [[models]]")
    if problems:
        raise ConfigError("\n".join(problems))


def load_catalogue(path: Path, neuron_names: set[str] | None = None) -> Catalogue:
    catalogue = validate_settings(Catalogue, read_toml(path), str(path))
    check_catalogue(catalogue, str(path), neuron_names)
    return catalogue
