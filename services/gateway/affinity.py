"""Which replica of a model serves a request (gateway.routing = "prefix").

Two pure parts, apart from the router's I/O:

- `prefix_key(body, path, chars)`: a stable hash of how the request's prompt begins. Requests
  with equal keys share the start of their prompt, so the replica that served one holds that
  start in its KV cache (llama-server reuses the longest common prefix of a slot) and the next
  one skips its prefill.
- `choose(ring, key, loads, load_factor)`: consistent hashing with bounded load (CHWBL, as
  KubeAI does): the key's home replica on a hash ring serves it unless it already carries more
  than `load_factor` times the average load, or has every slot (-np) taken; then the next
  replica on the ring does.

What the key covers. For chat-style bodies it is the conversation's *opening*: the messages up
to and including the first user message (system/developer prompts, Anthropic's top-level
`system`, the Responses API's `instructions`, then the first user turn), rendered as role and
text, cut at `chars` characters. Later turns are left out on purpose: they change with every
request, so a key that covered them would move a conversation to another replica each turn.
Cut at `chars`, a long shared system prompt alone makes the key (all requests that share it
meet on one replica); a short one plus the first user turn makes it (each conversation keeps
its replica, and different conversations spread). For completions it is the prompt's start.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping

import msgspec

VNODES = 64  # ring points per replica: shares within a few % of even for 2..8 replicas

# ------------------------------------------------------------------ request bodies
# Only the fields the key needs: msgspec skips the rest (tools, images' bytes, options)
# without building objects for them, which keeps a 4 KB chat body at a few microseconds.


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _Message(msgspec.Struct):
    role: str = ""
    content: str | list[_Part] | None = None


class _Chat(msgspec.Struct):  # OpenAI chat (and Ollama's, converted), Anthropic messages
    messages: list[_Message] = []
    system: str | list[_Part] | None = None  # Anthropic: the system prompt is top-level


class _Responses(msgspec.Struct):  # OpenAI /v1/responses
    instructions: str | None = None
    input: str | list[_Message] | None = None


class _Completion(msgspec.Struct):  # /v1/completions (Ollama raw generate), /completion
    # a string, tokens, or a batch of either (the first one's start is the key)
    prompt: str | list[str | int | list[int]] | None = None


class _Extra(msgspec.Struct):
    filename: str = ""
    text: str = ""


class _Infill(msgspec.Struct):  # llama-server /infill: repo context first, then the prefix
    input_extra: list[_Extra] = []
    input_prefix: str = ""


_CHAT = msgspec.json.Decoder(_Chat)
_RESPONSES = msgspec.json.Decoder(_Responses)
_COMPLETION = msgspec.json.Decoder(_Completion)
_INFILL = msgspec.json.Decoder(_Infill)

_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/messages"})
_COMPLETION_PATHS = frozenset({"/v1/completions", "/completions", "/completion"})
_INFILL_PATHS = frozenset({"/infill"})
_RESPONSES_PATHS = frozenset({"/v1/responses"})
TOKEN_CHARS = 4  # a token list's key covers chars // TOKEN_CHARS tokens (about as much text)


def _text(content: str | list[_Part] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content if p.text)  # images and tool blocks: no text


def _opening(pieces: list[str], messages: Iterable[_Message], chars: int) -> None:
    """Append the rendering of messages up to and including the first user message (or
    until `chars` characters are rendered)."""
    size = sum(len(p) for p in pieces)
    for m in messages:
        text = _text(m.content)
        pieces.append(f"\x1e{m.role}\x1f")  # separators no text uses: roles cannot blur
        pieces.append(text)
        size += len(m.role) + 2 + len(text)
        if m.role == "user" or size >= chars:
            return


def _rendering(body: bytes, path: str, chars: int) -> str | None:
    if path in _CHAT_PATHS:
        chat = _CHAT.decode(body)
        pieces: list[str] = []
        if chat.system is not None:
            pieces += ["\x1esystem\x1f", _text(chat.system)]
        _opening(pieces, chat.messages, chars)
        return "".join(pieces)
    if path in _COMPLETION_PATHS:
        prompt = _COMPLETION.decode(body).prompt
        if isinstance(prompt, list):
            if not prompt:
                return None
            first = prompt[0]
            if isinstance(first, int):  # one prompt as tokens
                first = prompt
            if isinstance(first, list):
                return "\x1d" + ",".join(map(str, first[: max(1, chars // TOKEN_CHARS)]))
            prompt = first
        return prompt
    if path in _RESPONSES_PATHS:
        r = _RESPONSES.decode(body)
        pieces = ["\x1esystem\x1f", r.instructions] if r.instructions else []
        if isinstance(r.input, str):
            pieces += ["\x1euser\x1f", r.input]
        elif r.input:
            _opening(pieces, r.input, chars)
        return "".join(pieces)
    if path in _INFILL_PATHS:
        f = _INFILL.decode(body)
        pieces = [f"\x1e{e.filename}\x1f{e.text}" for e in f.input_extra]
        pieces.append("\x1eprefix\x1f" + f.input_prefix)
        return "".join(pieces)
    return None  # embeddings, rerank, token counts: no prompt to cache


def prefix_key(body: bytes, path: str, chars: int) -> str | None:
    """A stable key for the start of a request's prompt (16 hex digits), or None when the
    request has none (embeddings, rerank, an unparsable body): then any replica will do."""
    try:
        text = _rendering(body, path, chars)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # the instance answers it with its own error; no affinity to keep
    if not text:
        return None
    return hashlib.blake2b(text[:chars].encode(), digest_size=8).hexdigest()


# ------------------------------------------------------------------ the chooser


def _point(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")


class Ring:
    """Replicas on a hash ring, VNODES points each, placed by instance id: adding or removing
    one replica moves only the keys whose walk meets its points (about 1/n of them)."""

    __slots__ = ("ids", "points", "owners")

    def __init__(self, ids: Iterable[str], vnodes: int = VNODES):
        self.ids = tuple(sorted(set(ids)))
        marks = sorted((_point(f"{iid}#{v}"), iid) for iid in self.ids for v in range(vnodes))
        self.points = [p for p, _ in marks]
        self.owners = [iid for _, iid in marks]

    def walk(self, key: str) -> Iterable[str]:
        """Distinct replicas in ring order from the key's point: its home replica first."""
        n = len(self.points)
        start = bisect.bisect(self.points, _point(key))
        seen: set[str] = set()
        for i in range(n):
            iid = self.owners[(start + i) % n]
            if iid not in seen:
                seen.add(iid)
                yield iid
                if len(seen) == len(self.ids):
                    return


def bound(loads: Mapping[str, int], ids: Iterable[str], load_factor: float, slots: int = 0) -> int:
    """The most requests a replica may hold before the next one takes a key's request:
    ceil(load_factor x (total + 1) / n), the total counting the request being placed; and
    at most `slots` (the replica's -np, 0 = no such limit): past it the request would wait in
    llama-server's own queue while another replica may have a slot free."""
    ids = tuple(ids)
    total = sum(loads.get(i, 0) for i in ids)
    limit = max(1, math.ceil(load_factor * (total + 1) / len(ids)))
    return min(limit, slots) if slots > 0 else limit


def choose(
    ring: Ring, key: str, loads: Mapping[str, int], load_factor: float, slots: int = 0
) -> tuple[str, str]:
    """(instance id, reason): the first replica on the key's walk whose load is below the
    bound. Deterministic: the same ring, key and loads always give the same answer."""
    if not ring.ids:
        raise ValueError("no replicas to choose from")
    limit = bound(loads, ring.ids, load_factor, slots)
    home = None
    for iid in ring.walk(key):
        load = loads.get(iid, 0)
        if load < limit:
            if home is None:
                return iid, f"home replica (load {load} < bound {limit})"
            return iid, f"home {home} at its bound {limit}: next on the ring (load {load})"
        home = home or iid
    # Every replica's slots are taken (other gateways' requests, or a config with more in
    # flight than slots): the least busy one queues it.
    iid = min(ring.ids, key=lambda i: loads.get(i, 0))
    return iid, f"every replica at the bound {limit}: least busy"


def choose_among(
    ids: Iterable[str], key: str, loads: Mapping[str, int], load_factor: float, slots: int = 0
) -> tuple[str, str]:
    """`choose` on a ring built for these replicas (tests and one-off use; the router keeps
    its rings)."""
    return choose(Ring(ids), key, loads, load_factor, slots)


def shares(ring: Ring, keys: Iterable[str]) -> dict[str, int]:
    """Each replica's share of `keys` at zero load (for benchmarks and tests)."""
    share: dict[str, int] = dict.fromkeys(ring.ids, 0)
    for k in keys:
        share[next(iter(ring.walk(k)))] += 1
    return share
