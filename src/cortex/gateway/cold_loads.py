"""Cold loads: place, evict, `POST /models/load`, follow progress until loaded. Single-flight per model.

Every request for a model that is being loaded awaits the same `LoadJob`, shielded: a client that
gives up never cancels a load others (or the next request) will use. Placement and the marking of
victims happen under one lock and without awaiting, so two cold loads never plan with the same
free memory and a victim gets no new requests; the VRAM a load will take is reserved on its
devices until a poll shows the model's measured usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from cortex.core.catalogue import CatalogueModel
from cortex.core.errors import ApiError
from cortex.core.gateway_config import LoadSection
from cortex.core.logs import log_event
from cortex.core.neuron_api import ModelStatus
from cortex.gateway import neuron_client
from cortex.gateway.evictor import Evictor
from cortex.gateway.metrics import Metrics
from cortex.gateway.neuron_client import NeuronRefused, NeuronUnreachable
from cortex.gateway.placement import NoPlacement, Placer, Plan
from cortex.gateway.poller import Poller
from cortex.gateway.state import FleetState, Node, Reservation

log = logging.getLogger("cortex.gateway.cold_loads")

# A neuron answers 202 before the model shows in /models only if its bookkeeping lags; allow a few reads.
_MISSING_GRACE_READS = 8
# Polls in a row that failed other than by timing out (reset, broken answer) before a loading node counts as lost.
_LOST_AFTER_FAILURES = 3


@dataclass
class LoadJob:
    model_id: str
    started: float = field(default_factory=time.monotonic)
    node: str | None = None  # set once placed
    only_node: str | None = None  # the node an operator asked for
    phase: str = "placing"  # placing → evicting → loading → loaded | failed
    placed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[str] | None = None

    async def wait(self) -> str:
        """The node it loaded on; raises the load's ApiError. Cancelling the waiter never cancels the load."""
        assert self.task is not None
        return await asyncio.shield(self.task)


@dataclass
class Loader:
    state: FleetState
    session: aiohttp.ClientSession
    placer: Placer
    evictor: Evictor
    poller: Poller
    metrics: Metrics
    config: LoadSection
    retry_after_s: float
    _jobs: list[LoadJob] = field(default_factory=list)
    _placement_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def jobs(self) -> list[LoadJob]:
        """Loads running now."""
        return list(self._jobs)

    def job(self, model_id: str, node: str | None = None) -> LoadJob | None:
        """A running load of `model_id` (on `node`, when given: placed there or restricted to it)."""
        for job in self._jobs:
            if job.model_id == model_id and (node is None or node in (job.node, job.only_node)):
                return job
        return None

    def load(self, spec: CatalogueModel, node: str | None = None) -> LoadJob:
        """Start or join a load of `spec`: anywhere (any running load of it will do) or on `node`."""
        job = self.job(spec.id, node)
        if job is not None:
            return job
        return self._start(LoadJob(spec.id, only_node=node), lambda job: self._cold_load(job, spec, node))

    def follow(self, node: Node, model_id: str) -> LoadJob:
        """Join a load on `node` that someone else started (the neuron reports it `loading`)."""
        job = self.job(model_id, node.name)
        if job is not None:
            return job
        job = LoadJob(model_id, node=node.name, phase="loading")
        job.placed.set()
        return self._start(job, lambda job: self._await_loaded(node, model_id, job))

    def _start(self, job: LoadJob, work: Callable[[LoadJob], Awaitable[str]]) -> LoadJob:
        self._jobs.append(job)
        job.task = asyncio.create_task(self._run(job, work), name=f"load-{job.model_id}")
        return job

    async def _run(self, job: LoadJob, work: Callable[[LoadJob], Awaitable[str]]) -> str:
        try:
            node = await work(job)
            job.phase = "loaded"
            return node
        except BaseException:
            job.phase = "failed"
            job.placed.set()  # waiters for placement see the failure through the task
            raise
        finally:
            self._jobs.remove(job)

    async def _cold_load(self, job: LoadJob, spec: CatalogueModel, only_node: str | None) -> str:
        plan = await self._place(spec, only_node)
        node = plan.node
        job.node = node.name
        job.placed.set()
        log_event(log, "load.placed", model=spec.id, **plan.log_fields())
        try:
            await self._evict_victims(plan)
            job.phase = "loading"
            started = time.monotonic()
            self.metrics.cold_starts.labels(spec.id, node.name).inc()
            await self._request_load(node, spec, plan)
            await self._await_loaded(node, spec.id, job)
            elapsed = time.monotonic() - started
            self.metrics.cold_start_duration.labels(spec.id, node.name).observe(elapsed)
            log_event(log, "load.done", model=spec.id, node=node.name, seconds=round(elapsed, 2))
            return node.name
        finally:
            node.reservations.pop(spec.id, None)

    async def _place(self, spec: CatalogueModel, only_node: str | None) -> Plan:
        async with self._placement_lock:
            try:
                plan = self.placer.plan(spec, time.monotonic(), only_node)
            except NoPlacement as exc:
                if exc.never_fits:  # a 4xx the client can act on, not a 503 to retry forever
                    raise ApiError(400, f"{exc}: it fits no neuron in this fleet", code="model_too_large") from None
                raise ApiError(
                    503,
                    str(exc),
                    code="model_unavailable" if exc.infeasible else "no_capacity",
                    retry_after=exc.retry_after or self.retry_after_s,
                ) from None
            # Synchronously, before any await: nothing new routes to a victim, nobody plans with this memory.
            for victim in plan.victims:
                victim.evicting = True
            plan.node.reservations[spec.id] = Reservation(plan.devices, plan.mb_per_device)
            return plan

    async def _evict_victims(self, plan: Plan) -> None:
        for index, victim in enumerate(plan.victims):
            try:
                await self.evictor.evict(plan.node, victim, timeout=self.config.timeout_s)
            except (NeuronUnreachable, NeuronRefused) as exc:
                for rest in plan.victims[index:]:
                    rest.evicting = False
                raise ApiError(
                    502, f"could not evict '{victim.model_id}' to make room: {exc}", code="eviction_failed"
                ) from None

    async def _request_load(self, node: Node, spec: CatalogueModel, plan: Plan) -> None:
        # Device indexes mean CUDA devices to a neuron; a CPU neuron picks its one "device" itself.
        on_gpu = any(node.devices[i].kind != "cpu" for i in plan.devices if i in node.devices)
        body = spec.load_request(plan.devices if on_gpu else None).model_dump(exclude_none=True)
        node.epoch += 1
        try:
            await neuron_client.post_json(self.session, node, "/models/load", body, timeout=self.config.timeout_s)
        except NeuronRefused as exc:
            if exc.status == 409:  # already loading there: follow it like our own
                return
            # A 4xx is about the request (a bad source, a path outside model_roots): the caller's to fix.
            status = exc.status if 400 <= exc.status < 500 else 502
            raise ApiError(
                status, f"neuron '{node.name}' refused to load '{spec.id}': {exc}", code="load_refused"
            ) from None
        except NeuronUnreachable as exc:
            raise ApiError(502, str(exc), code="upstream_unreachable") from None

    async def _await_loaded(self, node: Node, model_id: str, job: LoadJob) -> str:
        """Follow the neuron's `/models` until the model is loaded (or failed, gone, timed out)."""
        deadline = time.monotonic() + self.config.timeout_s
        missing = failures = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.poller.refresh_models(node)
            except NeuronUnreachable as exc:
                # A load keeps a neuron busy (on a crowded host its answers can take seconds): a poll that timed out
                # is no news, and the load timeout bounds the wait. Refused means nothing listens there any more.
                if exc.timed_out:
                    continue
                failures += 1
                if exc.refused or failures >= _LOST_AFTER_FAILURES:
                    raise ApiError(
                        502, f"lost neuron '{node.name}' while loading '{model_id}': {exc}", code="upstream_unreachable"
                    ) from None
                continue
            except NeuronRefused as exc:
                raise ApiError(
                    502, f"lost neuron '{node.name}' while loading '{model_id}': {exc}", code="upstream_unreachable"
                ) from None
            failures = 0
            replica = node.replicas.get(model_id)
            if replica is None:
                missing += 1
                if missing >= _MISSING_GRACE_READS:
                    raise ApiError(502, f"'{model_id}' vanished from '{node.name}' while loading", code="load_failed")
                continue
            if replica.status == ModelStatus.LOADED:
                with contextlib.suppress(NeuronUnreachable, NeuronRefused):
                    await self.poller.poll_node(node)  # measured VRAM and free memory, before the reservation goes
                return node.name
            if replica.status == ModelStatus.FAILED:
                reason = replica.error or "no reason given"
                log_event(log, "load.failed", logging.WARNING, model=model_id, node=node.name, error=reason)
                raise ApiError(502, f"loading '{model_id}' on '{node.name}' failed: {reason}", code="load_failed")
        raise ApiError(
            504,
            f"loading '{model_id}' on '{node.name}' took longer than {self.config.timeout_s:.0f}s",
            code="load_timeout",
        )
