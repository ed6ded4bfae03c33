"""Admission control: bounded, FIFO, and never pinned by a caller that left."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.admission import Gate, Limits, Verdict, decide
from services.gateway.errors import ApiError

LIMITS = Limits(max_in_flight=2, max_queue=2, queue_timeout=5)


def test_decide_runs_under_the_limit_queues_then_rejects():
    assert decide(0, 0, LIMITS) is Verdict.RUN
    assert decide(2, 0, LIMITS) is Verdict.QUEUE
    assert decide(1, 1, LIMITS) is Verdict.QUEUE  # FIFO: nobody jumps the queue
    assert decide(2, 2, LIMITS) is Verdict.REJECT


async def test_past_queue_bound_is_refused_at_once_with_retry_after():
    gate = Gate("m", LIMITS)
    await gate.enter()
    await gate.enter()
    waiting = [asyncio.create_task(gate.enter()) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(ApiError) as e:
        await gate.enter()
    assert e.value.status == 429 and e.value.retry_after and e.value.retry_after >= 1
    gate.leave()
    gate.leave()
    await asyncio.gather(*waiting)
    assert gate.in_flight == 2 and gate.queued == 0


async def test_slots_are_granted_in_arrival_order():
    gate = Gate("m", Limits(1, 10, 5))
    await gate.enter()
    order: list[int] = []

    async def wait(i: int) -> None:
        await gate.enter()
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        gate.leave()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


async def test_a_caller_that_left_never_pins_a_slot():
    gate = Gate("m", Limits(1, 10, 5))
    await gate.enter()
    gone = asyncio.create_task(gate.enter())
    stays = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    gate.leave()
    await asyncio.wait_for(stays, 1)
    assert gate.in_flight == 1 and gate.queued == 0
    gate.leave()
    assert gate.in_flight == 0


async def test_queued_request_times_out_with_429():
    gate = Gate("m", Limits(1, 10, 0.05))
    await gate.enter()
    with pytest.raises(ApiError) as e:
        await gate.enter()
    assert e.value.status == 429 and e.value.code == "queue_timeout"
    assert gate.queued == 0


async def test_a_caller_cancelled_as_its_slot_is_granted_leaves_and_hands_the_slot_on():
    # The grant and the cancel land in the same loop turn (a client leaves just as a slot
    # frees): the caller must see the cancel, not run its request for nobody.
    gate = Gate("m", Limits(1, 10, 5))
    await gate.enter()
    leaving = asyncio.create_task(gate.enter())
    next_in_line = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    gate.leave()  # grants `leaving` its slot...
    leaving.cancel()  # ...which it no longer wants
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await asyncio.wait_for(next_in_line, 1)
    assert gate.in_flight == 1 and gate.queued == 0
