"""Resolve a model source to files, refuse unsafe ones, and load weights + tokenizer onto a device.

Runs on the device's worker thread. Every failure leaves as a `LoadError` with a short reason code
(missing_files | out_of_memory | unsupported_architecture | forbidden | error) and a one-line message.
`trust_remote_code` is never enabled: a load request must not be able to run code from a model repo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import gguf_cache
from .memory import cuda_allocated, is_cuda, module_bytes
from .tools import tool_call_mode
from .types import LoadError, LoadSpec, ModelInfo

Progress = Callable[[float, str], None]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
DEFAULT_CONTEXT = 2048  # when neither the spec nor the config says
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class ResolvedFiles:
    directory: Path
    gguf_file: str | None  # a GGUF file inside `directory`, or None for a safetensors directory
    use_safetensors: bool = True


@dataclass
class LoadedWeights:
    module: torch.nn.Module
    tokenizer: Any
    info: ModelInfo
    eos_ids: frozenset[int]


def import_libraries() -> None:
    """Import the transformers parts a load uses, once, before the neuron serves. Imported by the first load
    instead, they cost seconds of pure-Python work on the device worker, during which the event loop waits
    for the GIL and `/health` and `/models` answer late."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: F401


def load_weights(spec: LoadSpec, progress: Progress) -> LoadedWeights:
    """Load `spec` onto `spec.device`; raises LoadError only."""
    try:
        progress(0.0, "resolving")
        files = resolve_files(spec, progress)
        return _load_resolved(spec, files, progress)
    except LoadError:
        raise
    except Exception as exc:
        raise classify_load_failure(exc) from exc


def resolve_files(spec: LoadSpec, progress: Progress) -> ResolvedFiles:
    source = spec.source
    if source.kind == "hub":
        progress(0.05, "downloading")
        directory = download_from_hub(spec)
        if source.gguf_file:
            return gguf_files(directory / source.gguf_file)
        return safetensors_files(directory, spec.allow_pickle)
    if source.kind == "local":
        return safetensors_files(Path(source.location).expanduser(), spec.allow_pickle)
    if source.kind == "gguf":
        location = Path(source.location).expanduser()
        return gguf_files(location / source.gguf_file if source.gguf_file else location)
    raise LoadError("error", f"unknown model source kind {source.kind!r}")


def download_from_hub(spec: LoadSpec) -> Path:
    """Fetch only weights/config/tokenizer files; HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE apply as usual."""
    from huggingface_hub import snapshot_download

    source = spec.source
    if source.gguf_file:
        patterns = [source.gguf_file, "*.json"]
    else:
        patterns = HUB_PATTERNS + (["*.bin", "*.pt", "*.pth"] if spec.allow_pickle else [])
    path = snapshot_download(
        source.location,
        revision=source.revision,
        cache_dir=str(spec.cache_dir) if spec.cache_dir else None,
        allow_patterns=patterns,
    )
    return Path(str(path))


def safetensors_files(directory: Path, allow_pickle: bool) -> ResolvedFiles:
    if not directory.is_dir():
        raise LoadError("missing_files", f"model directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise LoadError("missing_files", f"no config.json in {directory}")
    if any(directory.glob("*.safetensors")):
        return ResolvedFiles(directory, None, use_safetensors=True)
    pickles = [p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise LoadError(
            "forbidden",
            "only pickled checkpoints (.bin/.pt) found: loading them can run arbitrary code, "
            "so they are refused unless the neuron's config allows pickles",
        )
    if pickles:
        return ResolvedFiles(directory, None, use_safetensors=False)
    raise LoadError("missing_files", f"no *.safetensors weights in {directory}")


def gguf_files(path: Path) -> ResolvedFiles:
    if not path.is_file():
        raise LoadError("missing_files", f"GGUF file not found: {path}")
    if path.suffix != ".gguf":
        raise LoadError("error", f"not a .gguf file: {path.name}")
    return ResolvedFiles(path.parent, path.name)


def pick_dtype(requested: str | None, device: str) -> torch.dtype:
    if requested in (None, "auto"):
        if not is_cuda(device):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return DTYPES[requested.lower()]
    except KeyError:
        raise LoadError("error", f"unsupported dtype {requested!r}; use one of {sorted(DTYPES)}") from None


def _load_resolved(spec: LoadSpec, files: ResolvedFiles, progress: Progress) -> LoadedWeights:
    dtype = pick_dtype(spec.dtype, spec.device)
    gguf = files.directory / files.gguf_file if files.gguf_file else None
    converted = gguf_cache.lookup(spec.gguf_cache_dir, gguf, dtype) if gguf and spec.gguf_cache_dir else None
    if converted is not None:  # this GGUF was dequantized before: read that instead (gguf_cache.py)
        files = ResolvedFiles(converted, None)
    config = _causal_lm_config(files)
    progress(0.2, "reading tokenizer")
    tokenizer = _load_tokenizer(files)
    progress(0.3, "reading converted weights" if converted else "reading weights")
    baseline = cuda_allocated(spec.device) if is_cuda(spec.device) else 0
    module = _load_module(files, dtype, spec.device)
    if gguf is not None and converted is None and spec.gguf_cache_dir is not None:
        progress(0.8, "saving converted weights")
        gguf_cache.store(spec.gguf_cache_dir, gguf, dtype, module, tokenizer)
    progress(0.85, "moving to device")
    module = module.to(spec.device).eval()
    memory = cuda_allocated(spec.device) - baseline if is_cuda(spec.device) else module_bytes(module)
    info = describe(spec, config, module, tokenizer, memory)
    return LoadedWeights(module, tokenizer, info, eos_token_ids(config, module, tokenizer))


def _gguf_kwargs(files: ResolvedFiles) -> dict[str, Any]:
    return {"gguf_file": files.gguf_file} if files.gguf_file else {}


def _causal_lm_config(files: ResolvedFiles) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(files.directory, trust_remote_code=False, **_gguf_kwargs(files))
    except (ValueError, KeyError) as exc:
        raise LoadError("unsupported_architecture", _one_line(exc)) from exc
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise LoadError("unsupported_architecture", f"{type(config).__name__} is not a causal language model")
    return config


def _load_tokenizer(files: ResolvedFiles) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(files.directory, trust_remote_code=False, **_gguf_kwargs(files))


def _load_module(files: ResolvedFiles, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": False, "dtype": dtype, **_gguf_kwargs(files)}
    if not files.gguf_file:
        kwargs["use_safetensors"] = files.use_safetensors
    if is_cuda(device):
        kwargs["device_map"] = device  # straight to the GPU, no full copy in host memory first
    return AutoModelForCausalLM.from_pretrained(files.directory, **kwargs)


def describe(spec: LoadSpec, config: Any, module: torch.nn.Module, tokenizer: Any, memory: int) -> ModelInfo:
    template = getattr(tokenizer, "chat_template", None)
    template_text = template if isinstance(template, str) else str(template or "")
    architectures = getattr(config, "architectures", None) or [type(module).__name__]
    extra = {"source": spec.source.kind}
    if spec.source.gguf_file:
        extra["gguf_file"] = spec.source.gguf_file
    return ModelInfo(
        model_id=spec.model_id,
        device=spec.device,
        context_length=context_length(config, spec.context_length),
        memory_bytes=memory,
        architecture=str(architectures[0]),
        dtype=str(next(module.parameters()).dtype).removeprefix("torch."),
        tool_call_format=tool_call_mode(template_text),  # "native:hermes"…, "generic" (tools in the prompt)
        chat_template=bool(template_text),
        extra=extra,
    )


def context_length(config: Any, requested: int | None) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [n for n in (getattr(text_config, "max_position_embeddings", None), requested) if n]
    return min(limits) if limits else DEFAULT_CONTEXT


def eos_token_ids(config: Any, module: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a turn: generation_config's (e.g. <|im_end|>, <|endoftext|>), config's, tokenizer's."""
    ids: set[int] = set()
    generation_config = getattr(module, "generation_config", None)
    for value in (getattr(generation_config, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def classify_load_failure(exc: BaseException) -> LoadError:
    """Map whatever transformers/huggingface_hub/torch raised to a reason code, without the traceback."""
    message = _one_line(exc)
    if _is_out_of_memory(exc):
        return LoadError("out_of_memory", message)
    unreachable = _hub_unreachable(exc)
    if unreachable is not None:
        cause = f"{type(unreachable).__name__}: {_one_line(unreachable)}"
        return LoadError("missing_files", f"the Hugging Face hub cannot be reached ({cause}): {HUB_OFFLINE_HINT}")
    hub_reason = _hub_reason(exc)
    if hub_reason:
        return LoadError(hub_reason, message)
    if isinstance(exc, FileNotFoundError | OSError):
        return LoadError("missing_files", message)
    if isinstance(exc, ValueError | KeyError):
        return LoadError("unsupported_architecture", message)
    return LoadError("error", f"{type(exc).__name__}: {message}")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


HUB_OFFLINE_HINT = (
    "pre-download the model into the Hugging Face cache on a connected machine (`hf download <repo>`), "
    "then run the neuron with HF_HUB_OFFLINE=1"
)


def _hub_unreachable(exc: BaseException) -> BaseException | None:
    """A failure to connect to the hub (DNS, refused, timed out), anywhere in the exception's chain."""
    import socket

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if isinstance(current, socket.gaierror | ConnectionRefusedError) or names & {
            "ConnectError",
            "ConnectTimeout",
            "ConnectionError",
            "NameResolutionError",
        }:
            return current
        current = current.__cause__ or current.__context__
    return None


def _hub_reason(exc: BaseException) -> str | None:
    try:
        from huggingface_hub import errors
    except ImportError:
        return None
    if isinstance(exc, errors.GatedRepoError | errors.DisabledRepoError):
        return "forbidden"
    not_found = (
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
        errors.EntryNotFoundError,
        errors.LocalEntryNotFoundError,
        errors.HFValidationError,
    )
    return "missing_files" if isinstance(exc, not_found) else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:_MESSAGE_LIMIT]
