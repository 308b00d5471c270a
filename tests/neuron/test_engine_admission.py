"""Admission's count bound: the model's KV-derived capacity by default, `max_in_flight` as an override."""

from __future__ import annotations

import asyncio

import pytest

from cortex.core.errors import ApiError
from cortex.neuron.admission import Admission
from cortex.neuron.config import AdmissionConfig, AdmissionLimits


async def hold(admission: Admission, release: asyncio.Event) -> None:
    async with admission.slot():
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_max_in_flight_is_unset_by_default() -> None:
    assert AdmissionConfig().limits_for("m").max_in_flight is None


async def test_without_capacity_or_override_nothing_waits_for_a_count() -> None:
    admission = Admission("m", AdmissionLimits(max_queue_depth=0))
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(admission, release)) for _ in range(40)]
    await settle()
    assert admission.in_flight == 40 and admission.queue_depth == 0
    release.set()
    await asyncio.gather(*tasks)
    assert admission.in_flight == 0


async def test_the_kv_capacity_bounds_in_flight_and_a_bigger_one_lets_waiters_in() -> None:
    admission = Admission("m", AdmissionLimits(max_queue_depth=1, max_wait_secs=5))
    admission.set_capacity(2)
    assert admission.max_in_flight == 2
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(admission, release)) for _ in range(3)]
    await settle()
    assert (admission.in_flight, admission.queue_depth) == (2, 1)
    with pytest.raises(ApiError) as refused:  # the queue (depth 1) is full
        async with admission.slot():
            pass
    assert refused.value.status == 429
    admission.set_capacity(3)
    await settle()
    assert (admission.in_flight, admission.queue_depth) == (3, 0)
    release.set()
    await asyncio.gather(*tasks)


async def test_an_explicit_max_in_flight_overrides_the_capacity() -> None:
    admission = Admission("m", AdmissionLimits(max_in_flight=1, max_queue_depth=4, max_wait_secs=5))
    admission.set_capacity(100)
    assert admission.max_in_flight == 1
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(admission, release)) for _ in range(2)]
    await settle()
    assert (admission.in_flight, admission.queue_depth) == (1, 1)
    release.set()
    await asyncio.gather(*tasks)
    assert admission.in_flight == 0
