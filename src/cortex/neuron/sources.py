"""Turn a load request's `source` string into a `ModelSource`, refusing what the config forbids.

A load request is an instruction to read files, so local paths resolve only under the configured
model roots (plus installed model packages, such as the embedded default's), and errors never
echo file contents.
"""

from __future__ import annotations

import re
from pathlib import Path

from cortex.core.errors import ApiError
from cortex.neuron.default_model import DEFAULT_MODEL_ID, default_gguf_path
from cortex.neuron.engine.types import ModelSource

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def allowed_roots(model_roots: list[Path]) -> list[Path]:
    roots = [r.expanduser().resolve() for r in model_roots]
    embedded = default_gguf_path()
    if embedded is not None:
        roots.append(embedded.parent.resolve())
    return roots


def resolve_source(
    model_id: str, source: str | None, model_roots: list[Path], revision: str | None = None
) -> ModelSource:
    if source is None and model_id == DEFAULT_MODEL_ID and (embedded := default_gguf_path()) is not None:
        return ModelSource("gguf", str(embedded.parent), gguf_file=embedded.name)
    location = source or model_id
    if location.startswith(("/", "./", "../", "~")) or location.endswith(".gguf"):
        return _local_source(location, allowed_roots(model_roots))
    if _HUB_ID.match(location):
        return ModelSource("hub", location, revision=revision)
    raise ApiError(400, f"source '{location}' is neither a hub id nor a local path", param="source")


def _local_source(location: str, roots: list[Path]) -> ModelSource:
    try:
        path = Path(location).expanduser().resolve()
    except (ValueError, OSError, RuntimeError):  # a NUL byte, an unknown ~user, a symlink loop
        raise ApiError(400, "source is not a usable local path", param="source", code="invalid_path") from None
    if not _under(path, roots):
        raise ApiError(
            403,
            f"source '{location}' is outside the neuron's model_roots; add its directory to model_roots in neuron.toml",
            type="permission_error",
            param="source",
            code="path_not_allowed",
        )
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ApiError(400, f"GGUF file '{location}' does not exist", param="source", code="missing_files")
        return ModelSource("gguf", str(path.parent), gguf_file=path.name)
    if not path.is_dir():
        raise ApiError(400, f"model directory '{location}' does not exist", param="source", code="missing_files")
    return ModelSource("local", str(path))
