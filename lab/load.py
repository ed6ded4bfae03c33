"""The steady load a fault runs under: CLIENTS clients, one small completion after
another, each with a deadline; every request ends served, refused clearly (an OpenAI error
body) or hung (no answer before its deadline)."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import httpx

DEADLINE_S = 30.0  # each request's own deadline: past it, the request hung
REFUSALS = (429, 502, 503, 504)  # clear refusals under a fault
CLIENTS = 3  # concurrent load clients: steady, not a flood (two cores run everything)


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer (deadline, connection error)
    seconds: float
    error: str
    at: float = 0.0  # time.monotonic() when it ended


class Load:
    """CLIENTS tasks sending small completions, one after another, until stopped."""

    def __init__(self, base: str, model: str, clients: int = CLIENTS):
        self.base = base
        self.model = model
        self.clients = clients
        self.outcomes: list[Outcome] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self.tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        async with asyncio.timeout(DEADLINE_S + 10):
            await asyncio.gather(*self.tasks)

    async def _client(self) -> None:
        body = {"model": self.model, "prompt": "hi", "max_tokens": 2}
        async with httpx.AsyncClient() as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = await c.post(f"{self.base}/v1/completions", json=body, timeout=DEADLINE_S)
                except httpx.HTTPError as e:
                    now = time.monotonic()
                    self.outcomes.append(Outcome(None, now - t0, repr(e), now))
                    await asyncio.sleep(0.5)
                    continue
                msg = ""
                if r.status_code != 200:
                    try:
                        msg = r.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        msg = f"not an OpenAI error body: {r.text[:200]!r}"
                now = time.monotonic()
                self.outcomes.append(Outcome(r.status_code, now - t0, msg, now))
                await asyncio.sleep(0.3)

    @property
    def served(self) -> int:
        return sum(o.status == 200 for o in self.outcomes)

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is not None and o.status != 200]

    @property
    def hung(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is None]

    @property
    def unclear(self) -> list[Outcome]:
        """Refusals that are not a clear one (a status of REFUSALS with an OpenAI body)."""
        return [
            o
            for o in self.refused
            if o.status not in REFUSALS or o.error.startswith("not an OpenAI")
        ]

    def counts(self, since: float = 0.0, until: float = float("inf")) -> tuple[int, int, int]:
        """(served, refused, hung) of the requests that ended in [since, until)."""
        window = [o for o in self.outcomes if since <= o.at < until]
        served = sum(o.status == 200 for o in window)
        hung = sum(o.status is None for o in window)
        return served, len(window) - served - hung, hung

    def longest_gap(self, since: float, until: float) -> float:
        """The longest time in [since, until] in which no request ended served."""
        served = sorted(o.at for o in self.outcomes if o.status == 200 and since <= o.at <= until)
        return max(b - a for a, b in itertools.pairwise([since, *served, until]))

    def summary(self) -> str:
        why = sorted({f"{o.status} {o.error[:120]}" for o in self.refused})
        return (
            f"served {self.served}, refused {len(self.refused)}, hung {len(self.hung)}"
            + "".join(f"\n    refusal: {w}" for w in why)
        )

    def check(self) -> None:
        """No request hung; every refusal was clear."""
        assert self.served > 0, self.outcomes
        assert not self.hung, self.hung
        assert not self.unclear, self.unclear
