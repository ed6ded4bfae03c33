"""Admission control: bounded, fair, following the model's slots, and never pinned by a
caller that left."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.admission import Gate, Limits, Verdict, decide
from services.gateway.errors import ApiError

LIMITS = Limits(max_in_flight=2, max_queue=2, queue_timeout=5)


def test_decide_runs_under_the_limit_queues_then_rejects():
    assert decide(0, 0, 2, 2) is Verdict.RUN
    assert decide(2, 0, 2, 2) is Verdict.QUEUE
    assert decide(1, 1, 2, 2) is Verdict.QUEUE  # FIFO: nobody jumps the queue
    assert decide(2, 2, 2, 2) is Verdict.REJECT


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
    assert order.index("polite") == 0, order  # FIFO would have served it 11th


async def test_a_client_sending_one_at_a_time_goes_next_every_time_despite_a_flood():
    gate = Gate("m", Limits(1, 100, 5))
    await gate.enter("flood")
    order: list[str] = []
    flood = await _queue(gate, "flood", 20, order)
    for _ in range(4):  # each time it comes back it waits only for the one running
        await _serve(gate, 1)  # the flood's next runs meanwhile
        polite = await _queue(gate, "polite", 1, order)
        await _serve(gate, 1)
        await asyncio.gather(*polite)
        assert order[-1] == "polite", order
    assert order.count("flood") == 4
    await _serve(gate, 20)
    await asyncio.gather(*flood)


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


# ------------------------------------------------------------------ slot-aware limit


def test_the_running_limit_is_the_ready_instances_slots_within_max_in_flight():
    from services.gateway.admission import Room, running_limit

    assert running_limit(32, Room(slots=1, ready=1)) == 1  # -np 1: one at a time
    assert running_limit(32, Room(slots=12, ready=3)) == 12  # three ready, 4 slots each
    assert running_limit(8, Room(slots=12, ready=3)) == 8  # max_in_flight still bounds it
    assert running_limit(32, Room(slots=2, ready=0)) == 2  # cold: one instance's worth
    assert running_limit(1, Room(slots=4, ready=0)) == 1
    # Requests finishing on a draining instance take none of the ready ones' slots.
    assert running_limit(32, Room(slots=4, ready=1, held=3)) == 7


def test_the_overlap_sends_one_more_per_slot_only_while_one_client_waits():
    from services.gateway.admission import Room, overlap_limit

    assert overlap_limit(32, Room(slots=4, ready=1), clients_waiting=1) == 8
    assert overlap_limit(32, Room(slots=4, ready=1), clients_waiting=0) == 8
    assert overlap_limit(32, Room(slots=4, ready=1), clients_waiting=2) == 4  # fair again
    assert overlap_limit(6, Room(slots=4, ready=1), clients_waiting=1) == 6  # max_in_flight
    assert overlap_limit(32, Room(slots=4, ready=0), clients_waiting=1) == 4  # cold: none
    assert overlap_limit(32, Room(slots=4, ready=1, held=2), clients_waiting=1) == 10


class Instances:
    """A gate's view of its model's instances that a test can change."""

    def __init__(self, slots: int, ready: int):
        self.slots, self.ready = slots, ready

    def __call__(self):  # type: ignore[no-untyped-def]
        from services.gateway.admission import Room

        return Room(self.slots * max(1, self.ready), self.ready, start_s=7.0)


async def test_a_new_ready_instance_lets_waiters_in_at_once_and_a_lost_one_cuts_nobody():
    room = Instances(slots=2, ready=1)
    gate = Gate("m", Limits(32, 100, 5), room=room)
    await gate.enter("a")
    await gate.enter("a")
    order: list[str] = []
    tasks = await _queue(gate, "a", 4, order)
    assert gate.in_flight == 2 and gate.queued == 4 and gate.would_queue()
    room.ready = 2  # a replica is ready: two more slots
    assert gate.fill() == 2
    await asyncio.sleep(0)
    assert order == ["a", "a"] and gate.in_flight == 4 and gate.queued == 2
    room.ready = 1  # it went: nobody is cut, and no slot is handed on until under the limit
    gate.leave()
    gate.leave()
    await asyncio.sleep(0)
    assert gate.in_flight == 2 and gate.queued == 2 and len(order) == 2
    gate.leave()  # under the limit again: the next waiter takes the freed slot
    await asyncio.sleep(0)
    assert gate.in_flight == 2 and gate.queued == 1 and len(order) == 3
    await _serve(gate, 3)
    await asyncio.gather(*tasks)


async def test_a_cold_model_admits_one_instance_worth_and_its_waiters_wait_for_the_start_too():
    room = Instances(slots=1, ready=0)
    gate = Gate("m", Limits(32, 100, 0.05, start_timeout=0.2), room=room)
    await gate.enter("a")  # goes on to demand the start
    assert gate.limit == 1 and gate.would_queue()
    assert gate.patience() == pytest.approx(0.25)  # a slot's wait plus a start's
    waiting = asyncio.create_task(gate.enter("a"))
    await asyncio.sleep(0.1)  # past queue_timeout alone, still waiting
    assert not waiting.done()
    room.ready = 1
    assert gate.patience() == pytest.approx(0.05)
    gate.leave()
    await asyncio.wait_for(waiting, 1)
    assert gate.in_flight == 1


def test_retry_after_is_the_queue_ahead_at_the_measured_rate_plus_an_awaited_start():
    from services.gateway.admission import retry_after

    assert retry_after(9, 1, 2.0) == 20.0  # ten requests, one at a time, 2 s each
    assert retry_after(9, 4, 2.0) == 5.0  # four slots drain it four times as fast
    assert retry_after(9, 4, 2.0, start_s=10.0) == 15.0
    assert retry_after(0, 4, 0.01) == 1.0  # at least a second
    assert retry_after(10_000, 1, 5.0) == 300.0  # at most five minutes


async def test_a_refusal_says_retry_after_from_the_slots_the_model_has():
    room = Instances(slots=2, ready=2)
    gate = Gate("m", Limits(32, 2, 5), room=room)
    gate.service_time.add("m", 4.0)
    for _ in range(4):
        await gate.enter()
    waiting = [asyncio.create_task(gate.enter()) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(ApiError) as e:
        await gate.enter()
    assert e.value.retry_after == 3.0  # (2 queued + this one) x 4 s / 4 slots
    room.ready = 0  # gone cold: a start comes first
    with pytest.raises(ApiError) as e:
        await gate.enter()
    assert e.value.retry_after == 7.0 + 3 * 4.0 / 2
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert gate.queued == 0


# ------------------------------------------------------------------ the order of grants


def test_grant_order_plays_the_fair_turns_forward():
    from services.gateway.admission import grant_order

    queues = {"flood": [1, 2, 3, 4], "polite": [9]}
    assert grant_order(queues, {"flood": 0.0, "polite": 0.0}, {}) == [1, 9, 2, 3, 4]
    assert grant_order(queues, {"flood": 2.0, "polite": 0.0}, {}) == [9, 1, 2, 3, 4]
    gold = {"gold": [1, 2, 3, 4], "bronze": [5, 6]}
    assert grant_order(gold, {}, {"gold": 2.0}) == [1, 5, 2, 3, 6, 4]
    assert grant_order(queues, {}, {}, until=9) == [1, 9]
    assert grant_order({}, {}, {}) == []


async def test_the_order_a_gate_tells_is_the_order_it_grants():
    gate = Gate("m", Limits(1, 100, 5), weights={"gold": 2.0})
    await gate.enter("x")
    granted: list[int] = []

    async def one(who: str, ticket: int) -> None:
        await gate.enter(who, ticket)
        granted.append(ticket)

    tasks = [asyncio.create_task(one("flood", t)) for t in range(6)]
    tasks += [asyncio.create_task(one("gold", t)) for t in range(10, 14)]
    tasks += [asyncio.create_task(one("polite", 20))]
    await asyncio.sleep(0)
    told = gate.order()
    assert sorted(told) == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 20]
    assert told.index(20) <= 3  # the last to come, served in the first round
    tasks[2].cancel()  # one leaves: it drops out of the order, the rest keep theirs
    await asyncio.sleep(0)
    assert gate.order() == [t for t in told if t != 2]
    told = gate.order()
    await _serve(gate, 11)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert granted == told


def test_the_stage_says_slot_or_start():
    from services.gateway.admission import stage_of

    assert stage_of(True, True, 1, 1, "instance x is ready") == (
        "waiting for a free slot (1 running on 1)"
    )
    assert stage_of(True, False, 1, 1, "instance x is starting on h1") == (
        "instance x is starting on h1"
    )
    assert stage_of(False, False, 1, 1, "no instance placed yet") == "no instance placed yet"


async def test_waiters_of_a_model_removed_by_a_reload_are_answered_at_once():
    gate = Gate("m", Limits(1, 10, 30))
    await gate.enter("a")  # the one slot is busy
    waiting = [asyncio.create_task(gate.enter(who)) for who in ("a", "b")]
    await asyncio.sleep(0)
    assert gate.queued == 2
    gone = ApiError(404, "model m was removed from the config", "model_not_found")
    assert gate.refuse_all(gone) == 2
    for task in waiting:
        with pytest.raises(ApiError) as e:
            await asyncio.wait_for(task, 1)  # at once, not after the 30 s queue timeout
        assert e.value.status == 404
    assert gate.queued == 0
    gate.leave()
    assert gate.in_flight == 0


async def test_a_stream_waits_for_a_free_slot_at_the_gateway_not_in_an_overlap():
    """A request that may not overlap (a streamed answer: it hears its place only while it
    waits here) is granted only on a really free slot, and what queues after it does not
    overtake it through the overlap."""
    room = Instances(slots=1, ready=1)
    gate = Gate("m", Limits(32, 100, 5, overlap=True), room=room)
    await gate.enter("a")  # the slot
    await gate.enter("a")  # and one overlapping it (one client waits: allowed)
    assert gate.in_flight == 2 and gate.would_queue() and gate.would_queue(overlap=False)
    order: list[str] = []

    async def go(name: str, overlap: bool) -> None:
        await gate.enter("a", overlap=overlap)
        order.append(name)

    stream = asyncio.create_task(go("stream", False))
    plain = asyncio.create_task(go("plain", True))
    await asyncio.sleep(0)
    assert order == [] and gate.queued == 2
    gate.leave()  # one running: under the overlap limit, but the slot is still taken
    await asyncio.sleep(0)
    assert order == [] and gate.in_flight == 1
    gate.leave()  # the slot is free: the stream first, then the plain one overlaps it
    await asyncio.sleep(0)
    assert order == ["stream", "plain"] and gate.in_flight == 2
    await asyncio.gather(stream, plain)
