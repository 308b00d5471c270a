"""Versions of everything that decides how a neuron behaves, for `/version`."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

import cortex


@functools.cache
def git_sha() -> str | None:
    """The checkout's commit when running from a source tree; None for an installed wheel."""
    root = Path(cortex.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@functools.cache
def version_info() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "package": "cortex-fleet",
        "version": cortex.__version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
