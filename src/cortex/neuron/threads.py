"""How many CPU threads the engine's torch ops may use, chosen from the cores this process may run on.

torch's default is one OpenMP thread per core *of the machine*, spinning between ops. On a shared or
busy host that collapses decode: measured on 2 busy cores, 0.6 to 2.7 tok/s instead of 7 to 19. So the
neuron decides, once at start and before torch does any work:

- intra-op threads: `[engine] threads` if set, else `OMP_NUM_THREADS` if the user set it, else the
  cores it may use (CPU affinity and the cgroup quota, or the share `cortex up` hands it through
  `[engine] cores`) less one for the event loop, at least one;
- inter-op threads: `[engine] interop_threads`, default 1 (the engine never forks torch work);
- the OpenMP spin policy: passive waiting (`OMP_WAIT_POLICY=PASSIVE`, `KMP_BLOCKTIME=0`), so idle
  workers sleep instead of burning the cores the event loop and the other threads need. OpenMP reads
  these when torch's libraries load, so `prepare_environment` must run before `import torch`; a value
  the user already set is kept.

Nothing here imports torch at module level: the CLI calls `prepare_environment` before importing it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("cortex.neuron.threads")

SPIN_POLICY_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # torch intra-op threads
    interop_threads: int
    cores: int  # the cores the choice was made from
    source: str  # "config" | "OMP_NUM_THREADS" | "cores"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_applied: ThreadChoice | None = None


def usable_cores(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_cpu_max)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _cgroup_quota(path: Path) -> int | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def default_threads(cores: int) -> int:
    """All the cores but one, which the event loop (and, under `cortex up`, the gateway) keeps."""
    return max(1, cores - 1)


def core_shares(cores: int, neurons: int) -> list[int]:
    """Split `cores` among `neurons` started on one host: as even as possible, at least one each."""
    if neurons < 1:
        return []
    base, extra = divmod(cores, neurons)
    return [max(1, base + (1 if i < extra else 0)) for i in range(neurons)]


def choose(
    threads: int | None = None,
    interop_threads: int | None = None,
    cores: int | None = None,
    environ: dict[str, str] | None = None,
) -> ThreadChoice:
    """The thread counts to use; `cores` (the share this neuron may count as its own) defaults to `usable_cores()`."""
    environ = os.environ if environ is None else environ
    available = usable_cores()
    share = min(cores, available) if cores is not None else available
    interop = interop_threads or 1
    if threads is not None:
        return ThreadChoice(threads, interop, share, "config")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), interop, share, "OMP_NUM_THREADS")
    return ThreadChoice(default_threads(share), interop, share, "cores")


def prepare_environment(choice: ThreadChoice, environ: dict[str, str] | None = None) -> list[str]:
    """Set OpenMP's thread count and passive waiting in the environment, unless the user set them.

    Returns the names it set. Must run before torch is imported: OpenMP reads them once, at load.
    """
    environ = os.environ if environ is None else environ
    wanted = {**SPIN_POLICY_ENV, "OMP_NUM_THREADS": str(choice.threads)}
    changed = [name for name in wanted if name not in environ]
    for name in changed:
        environ[name] = wanted[name]
    if "torch" in sys.modules and changed:
        log.warning("torch was imported before the OpenMP settings; %s take effect only in new processes", changed)
    return changed


def apply(choice: ThreadChoice) -> ThreadChoice:
    """Set torch's intra- and inter-op thread counts in this process; the choice actually in effect.

    Device worker threads pick the intra-op count up when they first run a torch op. The inter-op
    count can be set only before any inter-op work has started; if that already happened, torch keeps
    its count and the result says so.
    """
    global _applied
    import torch

    torch.set_num_threads(choice.threads)
    with contextlib.suppress(RuntimeError):  # already set, or inter-op work already ran
        torch.set_num_interop_threads(choice.interop_threads)
    _applied = ThreadChoice(torch.get_num_threads(), torch.get_num_interop_threads(), choice.cores, choice.source)
    return _applied


def current() -> dict[str, Any]:
    """What the engine runs with, for /discovery: the applied choice, or torch's own counts if none was made."""
    if _applied is not None:
        return _applied.as_dict()
    import torch

    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cores": usable_cores(),
        "source": "torch default",
    }


def share_environment(index: int, count: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for neuron `index` of `count` started on this host: it counts only its share of cores.

    The share goes in `NEURON_ENGINE__CORES`, which only shapes the default; an explicit `[engine] threads`
    still wins, and a share the caller already put in the environment is kept.
    """
    env = dict(os.environ if environ is None else environ)
    env.setdefault("NEURON_ENGINE__CORES", str(core_shares(usable_cores(), count)[index]))
    return env
