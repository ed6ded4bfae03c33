"""Prefix routing's pure parts: prefix keys from request bodies, consistent hashing with
bounded load, and the router's choice among replicas (plain values, no I/O)."""

from __future__ import annotations

import collections

import msgspec
import pytest

import proto
from lls.config import parse
from services.gateway import affinity, ollama
from services.gateway.affinity import Ring, bound, choose, choose_among, prefix_key
from services.gateway.router import Router

CHAT = "/v1/chat/completions"
SYSTEM = "You are the assistant of a small bakery. Answer in one short sentence. " * 4


def chat(*messages: tuple[str, object], **extra: object) -> bytes:
    msgs = [{"role": r, "content": c} for r, c in messages]
    return msgspec.json.encode({"model": "m", "messages": msgs, **extra})


# ------------------------------------------------------------------ prefix keys


def test_same_long_system_prompt_same_key_whatever_the_user_asks() -> None:
    a = prefix_key(chat(("system", SYSTEM), ("user", "Bread?")), CHAT, 64)
    b = prefix_key(chat(("system", SYSTEM), ("user", "Cakes on Sunday?")), CHAT, 64)
    other = prefix_key(chat(("system", "Another shop. " * 20), ("user", "Bread?")), CHAT, 64)
    assert a is not None and len(a) == 16
    assert a == b
    assert other != a


def test_short_opening_keys_the_conversation_and_later_turns_keep_it() -> None:
    turn1 = chat(("system", "Be brief."), ("user", "Tell me about rye."))
    turn2 = chat(
        ("system", "Be brief."),
        ("user", "Tell me about rye."),
        ("assistant", "Rye is a grain."),
        ("user", "And spelt?"),
    )
    other = chat(("system", "Be brief."), ("user", "Tell me about wheat."))
    k1, k2, k3 = (prefix_key(b, CHAT, 2048) for b in (turn1, turn2, other))
    assert k1 == k2  # a conversation keeps its replica turn after turn
    assert k1 != k3  # different conversations spread


def test_only_the_first_chars_count() -> None:
    base = "x" * 100
    a = prefix_key(chat(("user", base + "tail one")), CHAT, 100)
    b = prefix_key(chat(("user", base + "another tail")), CHAT, 100)
    c = prefix_key(chat(("user", base + "tail one")), CHAT, 200)
    assert a == b
    assert c != a


def test_roles_are_part_of_the_key() -> None:
    as_system = prefix_key(chat(("system", SYSTEM)), CHAT, 2048)
    as_user = prefix_key(chat(("user", SYSTEM)), CHAT, 2048)
    assert as_system != as_user


def test_content_parts_render_like_a_string_and_images_do_not_count() -> None:
    parts = [
        {"type": "text", "text": "Look at "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "this."},
    ]
    assert prefix_key(chat(("user", parts)), CHAT, 2048) == prefix_key(
        chat(("user", "Look at this.")), CHAT, 2048
    )


def test_anthropic_messages_top_level_system() -> None:
    body = msgspec.json.encode(
        {
            "model": "m",
            "max_tokens": 8,
            "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Bread?"}]}],
        }
    )
    openai = chat(("system", SYSTEM), ("user", "Bread?"))
    assert prefix_key(body, "/v1/messages", 2048) == prefix_key(openai, CHAT, 2048)


def test_responses_instructions_and_input() -> None:
    openai = prefix_key(chat(("system", SYSTEM), ("user", "Bread?")), CHAT, 2048)
    as_string = msgspec.json.encode({"model": "m", "instructions": SYSTEM, "input": "Bread?"})
    as_items = msgspec.json.encode(
        {
            "model": "m",
            "instructions": SYSTEM,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Bread?"}]}],
        }
    )
    assert prefix_key(as_string, "/v1/responses", 2048) == openai
    assert prefix_key(as_items, "/v1/responses", 2048) == openai


def test_completions_prompt_string_tokens_and_batches() -> None:
    def completion(prompt: object) -> bytes:
        return msgspec.json.encode({"model": "m", "prompt": prompt, "max_tokens": 4})

    path = "/v1/completions"
    a = prefix_key(completion("Once upon a time " * 10 + "there"), path, 64)
    b = prefix_key(completion("Once upon a time " * 10 + "here"), path, 64)
    assert a is not None and a == b
    assert prefix_key(completion(["Once upon a time " * 10, "x"]), path, 64) == a
    tokens = prefix_key(completion(list(range(100))), path, 64)  # 64 chars ~ 16 tokens
    assert tokens is not None
    assert tokens == prefix_key(completion(list(range(16)) + [7, 7]), path, 64)
    assert tokens == prefix_key(completion([list(range(20))]), path, 64)
    assert tokens != prefix_key(completion(list(range(1, 100))), path, 64)


def test_infill_keys_on_repo_context_then_prefix() -> None:
    def infill(prefix: str, suffix: str) -> bytes:
        extra = [{"filename": "a.py", "text": "import os\n" * 10}]
        return msgspec.json.encode(
            {"input_extra": extra, "input_prefix": prefix, "input_suffix": suffix}
        )

    a = prefix_key(infill("def f():\n", "return 1"), "/infill", 2048)
    assert a is not None
    assert a == prefix_key(infill("def f():\n", "return 2"), "/infill", 2048)
    assert a != prefix_key(infill("def g():\n", "return 1"), "/infill", 2048)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", b'{"model": "m", "input": "hello"}'),
        ("/v1/rerank", b'{"model": "m", "query": "q", "documents": ["a"]}'),
        ("/v1/messages/count_tokens", b'{"model": "m", "messages": []}'),
        (CHAT, b"{not json"),
        (CHAT, b'{"model": "m", "messages": "not a list"}'),
        (CHAT, b'{"model": "m", "messages": []}'),
        ("/v1/completions", b'{"model": "m", "prompt": []}'),
        ("/v1/completions", b'{"model": "m"}'),
    ],
)
def test_no_prompt_no_key(path: str, body: bytes) -> None:
    assert prefix_key(body, path, 2048) is None


def test_ollama_bodies_key_like_openai() -> None:
    """/api/chat and /api/generate reach the proxy converted to OpenAI bodies."""
    req = ollama.parse_body(
        msgspec.json.encode(
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "Bread?"},
                ],
            }
        ),
        ollama.ChatRequest,
    )
    via_chat = prefix_key(msgspec.json.encode(ollama.chat_request(req, "m")), CHAT, 2048)
    gen = ollama.parse_body(
        msgspec.json.encode({"model": "m", "system": SYSTEM, "prompt": "Bread?"}),
        ollama.GenerateRequest,
    )
    path, body = ollama.generate_request(gen, "m")
    via_generate = prefix_key(msgspec.json.encode(body), path, 2048)
    openai = prefix_key(chat(("system", SYSTEM), ("user", "Bread?")), CHAT, 2048)
    assert via_chat == via_generate == openai
    raw = ollama.parse_body(
        msgspec.json.encode({"model": "m", "prompt": "Once upon a time", "raw": True}),
        ollama.GenerateRequest,
    )
    path, body = ollama.generate_request(raw, "m")
    assert path == "/v1/completions"
    assert prefix_key(msgspec.json.encode(body), path, 2048) is not None


# ------------------------------------------------------------------ the chooser

KEYS = [f"{i:016x}" for i in range(2000)]


def test_bound_is_the_load_factor_times_the_average_with_the_newcomer() -> None:
    assert bound({}, ["a", "b"], 1.25) == 1  # ceil(1.25 * 1 / 2)
    assert bound({"a": 1}, ["a", "b"], 1.25) == 2  # ceil(1.25 * 2 / 2)
    assert bound({"a": 3, "b": 1}, ["a", "b"], 1.25) == 4  # ceil(1.25 * 5 / 2)
    assert bound({"a": 3, "c": 50}, ["a", "b"], 1.0) == 2  # other models' loads do not count


def test_affinity_holds_under_the_bound() -> None:
    ring = Ring(["a", "b"])
    key = KEYS[0]
    home, why = choose(ring, key, {}, 1.25)
    assert "home" in why
    # The home replica keeps the key while its load stays below the bound.
    for load in range(1, 4):
        other = "b" if home == "a" else "a"
        loads = {home: load, other: load - 1}  # bound ceil(1.25 * 2load / 2) > load
        assert choose(ring, key, loads, 1.25)[0] == home


def test_spills_to_the_next_replica_past_the_bound() -> None:
    ring = Ring(["a", "b", "c"])
    key = KEYS[1]
    walk = list(ring.walk(key))
    assert sorted(walk) == ["a", "b", "c"]
    home, second, third = walk
    # total 3 -> bound ceil(1.25 * 4 / 3) = 2: home at 2 is full
    iid, why = choose(ring, key, {home: 2, second: 1}, 1.25)
    assert iid == second
    assert home in why and "next" in why
    iid, _ = choose(ring, key, {home: 2, second: 2, third: 0}, 1.0)  # bound ceil(5/3) = 2
    assert iid == third


def test_a_burst_of_one_key_spreads_over_all_replicas_within_the_bound() -> None:
    ring = Ring(["a", "b"])
    loads: dict[str, int] = collections.Counter()
    for _ in range(20):  # 20 requests of one prefix arrive before any ends
        iid, _ = choose(ring, KEYS[2], loads, 1.25)
        loads[iid] += 1
    # the home takes at most ceil(1.25 x the average) = 13, the other replica the rest
    assert sorted(loads.values()) == [7, 13]


def test_a_replica_with_every_slot_taken_is_full() -> None:
    """Past its -np a replica would queue the request inside llama-server while another
    replica may have a slot free: the slots cap the bound."""
    assert bound({"a": 3, "b": 0}, ["a", "b"], 1.25, slots=2) == 2
    assert bound({"a": 3, "b": 0}, ["a", "b"], 1.25, slots=8) == 3
    ring = Ring(["a", "b"])
    home, second = ring.walk(KEYS[4])
    assert choose(ring, KEYS[4], {home: 1}, 1.25, slots=2)[0] == home
    assert choose(ring, KEYS[4], {home: 2, second: 1}, 1.25, slots=2)[0] == second
    # all slots taken (more in flight than slots): the least busy one queues it
    iid, why = choose(ring, KEYS[4], {home: 3, second: 2}, 1.25, slots=2)
    assert iid == second and "least busy" in why


def test_deterministic_and_order_free() -> None:
    loads = {"a": 1, "b": 2, "c": 0}
    first = [choose(Ring(["a", "b", "c"]), k, loads, 1.25) for k in KEYS[:200]]
    again = [choose(Ring(["c", "a", "b"]), k, loads, 1.25) for k in KEYS[:200]]
    assert first == again


def test_keys_spread_over_replicas() -> None:
    shares = affinity.shares(Ring(["a", "b"]), KEYS)
    assert min(shares.values()) > 0.35 * len(KEYS)
    shares = affinity.shares(Ring(["a", "b", "c", "d"]), KEYS)
    assert min(shares.values()) > 0.15 * len(KEYS)


def test_adding_a_replica_moves_only_its_share() -> None:
    before = Ring(["a", "b", "c"])
    after = Ring(["a", "b", "c", "d"])
    moved = 0
    for k in KEYS:
        old, _ = choose(before, k, {}, 1.25)
        new, _ = choose(after, k, {}, 1.25)
        if old != new:
            moved += 1
            assert new == "d"  # a key only ever moves to the newcomer
    assert 0.1 * len(KEYS) < moved < 0.4 * len(KEYS)  # about a quarter
    # and removing it again gives every key back to its old replica
    assert all(choose(before, k, {}, 1.25) == choose_among("abc", k, {}, 1.25) for k in KEYS)


def test_removing_a_replica_moves_only_its_keys() -> None:
    full = Ring(["a", "b", "c"])
    less = Ring(["a", "c"])
    for k in KEYS:
        old, _ = choose(full, k, {}, 1.25)
        if old != "b":
            assert choose(less, k, {}, 1.25)[0] == old


def test_no_replicas_is_an_error() -> None:
    with pytest.raises(ValueError):
        choose(Ring([]), "k", {}, 1.25)


# ------------------------------------------------------------------ the router's pick


def router(
    routing: str, n: int = 2, args: list[str] | None = None
) -> tuple[Router, list[proto.InstanceRecord]]:
    cfg = parse(
        {
            "models": {"m": {"url": "file:///m.gguf", "args": args or []}},
            "gateway": {"routing": routing, "prefix_load_factor": 1.25},
        }
    )
    r = Router(None, cfg, "g1")  # type: ignore[arg-type]  # pick never touches the bus
    recs = [
        proto.InstanceRecord(
            instance_id=f"m-{i}",
            model="m",
            state=proto.InstanceState.READY,
            created=0,
            updated=0,
            host="h1",
            endpoint=f"http://127.0.0.1:{9000 + i}",
        )
        for i in range(n)
    ]
    r.ready["m"] = recs
    return r, recs


def test_pick_follows_the_prefix_and_spills_past_the_bound() -> None:
    r, _ = router("prefix", args=["-np", "8"])  # slots to spare: the load bound decides
    key = KEYS[3]
    home = r.pick("m", key)
    assert home is not None
    assert all(r.pick("m", key) is home for _ in range(5))
    ring = r._rings["m"]
    r.in_flight[home.instance_id] = 1  # bound ceil(1.25 * 2 / 2) = 2: still home
    assert r.pick("m", key) is home
    assert r._rings["m"] is ring  # no rebuild per request
    r.in_flight[home.instance_id] = 2  # bound ceil(1.25 * 3 / 2) = 2: full
    spilled = r.pick("m", key)
    assert spilled is not None and spilled is not home
    r.in_flight.clear()
    keys = {r.pick("m", k).instance_id for k in KEYS[:50]}  # type: ignore[union-attr]
    assert len(keys) == 2  # other prefixes use the other replica


def test_pick_caps_a_replica_at_the_models_slots() -> None:
    r, _ = router("prefix", n=2, args=["-np", "2"])
    key = KEYS[5]
    home = r.pick("m", key)
    assert home is not None
    other = next(x for x in r.ready["m"] if x is not home)
    r.in_flight = {home.instance_id: 2, other.instance_id: 1}  # bound 2 by load and by slots
    assert r.pick("m", key) is other
    r, _ = router("prefix", n=2, args=["-np", "4"])
    r.in_flight = {home.instance_id: 2, other.instance_id: 1}  # bound ceil(1.25 * 4 / 2) = 3
    assert r.pick("m", key).instance_id == home.instance_id  # type: ignore[union-attr]


def test_pick_without_a_prefix_is_least_busy() -> None:
    r, recs = router("prefix")
    r.in_flight = {"m-0": 3, "m-1": 1}
    assert r.pick("m", None) is recs[1]
    r, recs = router("least_busy")
    r.in_flight = {"m-0": 0, "m-1": 2}
    assert r.pick("m", KEYS[0]) is recs[0]


def test_ring_follows_replicas_that_come_and_go() -> None:
    r, recs = router("prefix", n=3)
    r.pick("m", KEYS[0])
    assert r._rings["m"].ids == ("m-0", "m-1", "m-2")
    r.bad_until[recs[2].endpoint or ""] = float("inf")  # refused a connection: skipped
    assert {r.pick("m", k).instance_id for k in KEYS[:50]} == {"m-0", "m-1"}  # type: ignore[union-attr]
    assert r._rings["m"].ids == ("m-0", "m-1")


async def test_round_robin_turns_on_acquire_only() -> None:
    r, _ = router("round_robin", n=2)
    assert r.pick("m") is r.pick("m")  # a look (the cold-start check) takes no turn
    got = [(await r.acquire("m", 1.0)).instance_id for _ in range(4)]
    assert got == ["m-0", "m-1", "m-0", "m-1"]


def test_one_replica_needs_no_ring() -> None:
    r, recs = router("prefix", n=1)
    assert r.pick("m", KEYS[0]) is recs[0]
    assert "m" not in r._rings
