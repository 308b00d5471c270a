"""The device worker: one OS thread that owns every torch operation on one device.

Loads, forwards, cache resets, memory queries and unloads all run here as jobs from one FIFO queue,
so tensors never cross threads and work for different models on one device interleaves job by job.
The asyncio loop only posts jobs and awaits their futures; it never computes.
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

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerClosed(RuntimeError):
    """The worker was closed: no new jobs are accepted."""


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
        self._thread = threading.Thread(target=self._run, name=f"cortex-device-{device}", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def post(self, run: Callable[[], None], abandon: Callable[[], None] = _nothing) -> None:
        """Queue a fire-and-forget job; `abandon` runs instead if the worker closes before it does."""
        with self._wakeup:
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

        self.post(run, abandon=future.cancel)
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
        self._bind_device()
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
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(torch.device(self.device))
