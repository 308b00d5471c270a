"""The device worker: one OS thread that owns every torch operation on one device.

Loads, forwards, cache resets, memory queries and unloads all run here as jobs from one FIFO queue,
so tensors never cross threads and work for different models on one device interleaves job by job.
The asyncio loop only posts jobs and awaits their futures; it never computes.

If the thread cannot bind its device (a CPU-only torch on a GPU host, a bad ordinal), it records why
and stops: every queued job and every later `post`/`submit` fails at once with `DeviceUnavailable`,
so a load reports that reason instead of waiting forever on a thread that is gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .types import LoadError

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerClosed(RuntimeError):
    """The worker was closed: no new jobs are accepted."""


class DeviceUnavailable(WorkerClosed, LoadError):
    """The worker could not bind its device, so it runs nothing; a load sees reason `device_unavailable`."""

    def __init__(self, message: str) -> None:
        LoadError.__init__(self, "device_unavailable", message)


@dataclass(frozen=True)
class Job:
    run: Callable[[], None]
    abandon: Callable[[], None]  # called instead of `run` for jobs still queued when the worker closes


def _nothing() -> None:
    return None


class DeviceWorker:
    def __init__(self, device: str) -> None:
        self.device = device
        self._jobs: deque[Job] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._failure: str | None = None  # why the device could not be bound
        self._thread = threading.Thread(target=self._run, name=f"cortex-device-{device}", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    @property
    def failure(self) -> str | None:
        """Why the device could not be bound, once the thread has given up; None while it serves."""
        return self._failure

    def post(self, run: Callable[[], None], abandon: Callable[[], None] = _nothing) -> None:
        """Queue a fire-and-forget job; `abandon` runs instead if the worker closes before it does."""
        with self._wakeup:
            if self._failure is not None:
                raise DeviceUnavailable(self._failure)
            if self._closed:
                raise WorkerClosed(f"device worker {self.device} is closed")
            self._jobs.append(Job(run, abandon))
            self._wakeup.notify()

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue `fn`; its result or exception arrives through the returned future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller gave up before the job started
            try:
                result = fn()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

        def abandon() -> None:
            # A worker that lost its device says why; one closed on purpose just cancels.
            if self._failure is not None and future.set_running_or_notify_cancel():
                future.set_exception(DeviceUnavailable(self._failure))
            else:
                future.cancel()

        try:
            self.post(run, abandon)
        except DeviceUnavailable as exc:
            future.set_exception(exc)
        return future

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn))

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting jobs, let the running one finish, abandon the rest, and join the thread."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._bind_device()
        except BaseException as exc:  # the thread must not die silently: every job would wait forever
            log.error("device %s: cannot bind the device, failing its jobs: %s", self.device, exc)
            with self._wakeup:
                why = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
                self._failure = f"device {self.device} is unavailable: {why}"
                self._closed = True
            self._abandon_queued()
            return
        while True:
            job = self._next_job()
            if job is None:
                break
            try:
                job.run()
            except Exception:  # a job's own failure must not kill the device thread
                log.exception("device %s: job failed", self.device)
        self._abandon_queued()

    def _next_job(self) -> Job | None:
        with self._wakeup:
            while not self._jobs and not self._closed:
                self._wakeup.wait()
            if self._closed:
                return None
            return self._jobs.popleft()

    def _abandon_queued(self) -> None:
        with self._wakeup:
            jobs, self._jobs = list(self._jobs), deque()
        for job in jobs:
            try:
                job.abandon()
            except Exception:
                log.exception("device %s: abandoning a job failed", self.device)

    def _bind_device(self) -> None:
        # The current CUDA device is per thread: bind it once so every op here lands on our device.
        import torch

        device = torch.device(self.device)  # a name torch does not know fails here, not in the first load
        # OpenMP's thread count is per thread: a new thread starts at one per core, whatever the neuron
        # chose (threads.py). torch's own kernels catch up lazily; oneDNN and MKL, called directly
        # (cpu_linear.py), would not. Apply the process's choice to this thread before any work.
        torch.set_num_threads(torch.get_num_threads())
        if device.type == "cuda":
            check_cuda_device(device.index or 0)
            torch.cuda.set_device(device)


def check_cuda_device(index: int) -> None:
    """Raise RuntimeError with the plain reason why CUDA device `index` cannot be used by this torch."""
    import torch

    if torch.version.cuda is None:
        raise RuntimeError(f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build to use GPUs")
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no usable CUDA device (driver missing, or CUDA_VISIBLE_DEVICES hides them)")
    count = torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(f"there is no cuda:{index}: torch sees {count} CUDA device(s)")
