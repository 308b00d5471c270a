"""GGUF models converted once: the dequantized weights and the tokenizer, kept as a safetensors directory.

transformers reads a GGUF by parsing its whole header in Python and dequantizing every tensor: 30 s for
the 135M default model on two cores, minutes for a 7B. The result is the same every time, so the first load
saves it (in the dtype it was loaded in, with its config, generation config and tokenizer) and later loads
read that directory instead, in seconds.

An entry is named by what determines its contents: the GGUF's resolved path, size and modification time,
the dtype, and the transformers version that converted it. A changed file or a new transformers is a
new entry. Entries are written to a temporary directory and renamed into place, so a crash or a
concurrent neuron never leaves a half-written one that is read; `complete.json` is written last and an
entry without it is ignored. The cache is best effort: a full disk or a read-only directory costs only
the speed-up, never the load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from cortex.core.logs import log_event

log = logging.getLogger("cortex.neuron.gguf_cache")

FORMAT = 1  # bump when what an entry holds changes
MARKER = "complete.json"
HEADROOM_BYTES = 1 << 30  # leave at least this much free on the cache's disk


def entry_dir(root: Path, gguf_path: Path, dtype: torch.dtype) -> Path:
    import transformers

    resolved = gguf_path.resolve()
    stat = resolved.stat()
    identity = f"{FORMAT}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{transformers.__version__}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
    return root / f"{resolved.stem}-{str(dtype).removeprefix('torch.')}-{digest}"


def lookup(root: Path, gguf_path: Path, dtype: torch.dtype) -> Path | None:
    """The converted directory for this GGUF and dtype, if a complete one exists."""
    try:
        entry = entry_dir(root, gguf_path, dtype)
        return entry if (entry / MARKER).is_file() else None
    except OSError:
        return None


def store(root: Path, gguf_path: Path, dtype: torch.dtype, module: torch.nn.Module, tokenizer: Any) -> Path | None:
    """Save a GGUF-loaded model and tokenizer as an entry; None (and a warning) when it could not be saved."""
    try:
        entry = entry_dir(root, gguf_path, dtype)
        if (entry / MARKER).is_file():
            return entry
        root.mkdir(parents=True, exist_ok=True)
        needed = sum(p.numel() * p.element_size() for p in module.state_dict().values()) + HEADROOM_BYTES
        free = shutil.disk_usage(root).free
        if free < needed:
            log_event(log, "gguf_cache.skipped", logging.WARNING, path=str(root), free_mb=free >> 20)
            return None
    except OSError as exc:
        log_event(log, "gguf_cache.unavailable", logging.WARNING, path=str(root), error=str(exc))
        return None
    staging = root / f".tmp-{uuid.uuid4().hex}"
    try:
        _save_model(module, staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"format": FORMAT, "gguf": str(gguf_path.resolve())}))
        try:
            staging.rename(entry)
        except OSError:  # another neuron finished the same entry first: keep theirs
            if not (entry / MARKER).is_file():
                raise
        log_event(log, "gguf_cache.stored", entry=entry.name)
        return entry
    except (OSError, RuntimeError, ValueError) as exc:
        log_event(log, "gguf_cache.store_failed", logging.WARNING, path=str(root), error=str(exc))
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_model(module: torch.nn.Module, directory: Path) -> None:
    """Config, generation config and weights. Not `save_pretrained`: transformers refuses to save a model it
    loaded from a GGUF (its quantizer marks it so), although what it holds is plain dequantized tensors."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True)
    config = copy.deepcopy(module.config)  # type: ignore[union-attr]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    generation_config = getattr(module, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    save_model(module, str(directory / "model.safetensors"), metadata={"format": "pt"})  # ties saved once
