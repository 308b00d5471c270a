"""Session fixtures: tiny random-weight models built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.models import build_tiny_model, smollm_gguf


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The neurons tests start share one GGUF cache, new each session: the first load of the default model
    converts it, later ones read it, and the developer's own ~/.cache is left alone."""
    path = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEURON_GGUF_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and template (safetensors dir)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like `tiny_model`, with a Hermes/Qwen-style template that renders tools."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-tools", seed=1, tools=True)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    directory, name = smollm_gguf()
    return directory / name
