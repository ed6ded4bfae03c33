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


async def _queue(gate: Gate, who: str, n: int, order: list[str]) -> list[asyncio.Task]:
    async def one() -> None:
        await gate.enter(who)
        order.append(who)

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.sleep(0)
    return tasks


async def _serve(gate: Gate, n: int) -> None:
    for _ in range(n):
        gate.leave()
        await asyncio.sleep(0)


def test_next_turn_goes_to_the_least_served_waiting_client():
    from services.gateway.admission import next_turn

    assert next_turn(["a", "b"], {"a": 3.0, "b": 1.0}) == "b"
    assert next_turn(["a", "b"], {}) == "a"  # a tie: who started waiting first


async def test_a_flooding_client_delays_another_by_one_turn_not_by_its_flood():
    gate = Gate("m", Limits(1, 100, 5))
    await gate.enter("flood")
    order: list[str] = []
    tasks = await _queue(gate, "flood", 10, order)
    tasks += await _queue(gate, "polite", 1, order)  # arrives after the whole flood
    await _serve(gate, 11)
    await asyncio.gather(*tasks)
    assert order.index("polite") <= 1, order  # FIFO would have served it 11th


async def test_weights_share_the_slots_in_proportion():
    gate = Gate("m", Limits(1, 100, 5), weights={"gold": 2.0})
    await gate.enter("x")
    order: list[str] = []
    tasks = await _queue(gate, "gold", 12, order) + await _queue(gate, "bronze", 12, order)
    await _serve(gate, 9)
    assert order.count("gold") == 6 and order.count("bronze") == 3, order
    await _serve(gate, 16)
    await asyncio.gather(*tasks)


async def test_a_full_queue_makes_room_for_a_lighter_client_at_the_heaviest_ones_cost():
    gate = Gate("m", Limits(1, 3, 5))
    await gate.enter("flood")
    order: list[str] = []
    flood = await _queue(gate, "flood", 3, order)
    polite = await _queue(gate, "polite", 1, order)  # full queue: flood's newest goes
    await asyncio.sleep(0)
    pushed = flood[-1]
    assert pushed.done() and isinstance(pushed.exception(), ApiError)
    assert pushed.exception().status == 429
    with pytest.raises(ApiError):  # flood itself cannot push itself in
        await gate.enter("flood")
    await _serve(gate, 3)
    await asyncio.gather(*flood[:-1], *polite)
    assert order.index("polite") <= 1 and gate.queued == 0, order
