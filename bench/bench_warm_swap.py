"""Warm swaps: a long conversation's model is stopped and brought back; the next turn's TTFT
with its slot KV cache restored (agent.slot_cache_mib on) vs without (slot_cache_mib: 0).

One NATS server, two stacks in turn (process runtime, the cached llama-server, a tiny random
GGUF whose trained context is raised so that the conversation fits). Per stack and round:
turn 1 (the whole conversation), `lls stop`, wait until stopped, `lls load` (the restore
happens while the model starts, before it is READY), then turn 2 = the conversation plus a
short addition, streamed: TTFT is the time to its first streamed token; prompt_n is what
llama-server says it evaluated. Also: the time from asking the stopped model for turn 2 to
its first token (cold start included), in a second set of rounds. Medians over the rounds.

A benchmark that prints figures, not a test.

    .venv/bin/python bench/bench_warm_swap.py [--tokens 2000] [--rounds 5] [--models tiny,small]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts"), str(ROOT)]

import make_tiny_gguf  # noqa: E402
import proto  # noqa: E402
from conftest import NatsServer  # noqa: E402
from lls.bus import Bus, connect, kv_snapshot  # noqa: E402
from stack import Stack  # noqa: E402

WAIT_S = 120.0
ADDITION = " and what did you think of it then?"
# Random-weight llama shapes (scripts/make_tiny_gguf.py's constants). "tiny" is the tests'
# model: its prefill is so cheap (tens of thousands of tokens/s) that a turn's time is all
# overhead and attention over the cached tokens. "small" (~13M parameters, F32) has a weight-
# bound prefill like a real model's, just scaled down: there the saved prefill shows.
SHAPES = {
    "tiny": {"N_EMBD": 64, "N_HEAD": 4, "N_LAYER": 2, "N_FF": 128},
    "small": {"N_EMBD": 512, "N_HEAD": 8, "N_LAYER": 4, "N_FF": 1408},
}


def conversation(chars: int, seed: int = 7) -> str:
    """Words of random letters (~1.28 tokens a character in the tiny vocabulary)."""
    rng = random.Random(seed)
    text = ""
    while len(text) < chars:
        text += "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) + " "
    return text[:chars]


async def turn(c: httpx.AsyncClient, base: str, prompt: str) -> tuple[float, dict]:
    """Streamed completion: (seconds to the first token, llama-server's timings)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    body |= {"stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, timings = None, {}
    async with c.stream("POST", f"{base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error streamed: {chunk['error']}")
            # one chunk a token (a token may be part of a character: its text can be empty)
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - t0
            timings = chunk.get("timings") or timings
    if ttft is None:
        raise RuntimeError("no token streamed")
    return ttft, timings


async def states(bus: Bus) -> list[proto.InstanceState]:
    recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
    return [r.state for r in recs.values() if r.model == "tiny"]


async def until(bus: Bus, done, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + WAIT_S
    while not done(await states(bus)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def stop(bus: Bus) -> None:
    await bus.emit(proto.StopRequested(model="tiny", requested_by="bench"))
    live = proto.LIVE_STATES | {proto.InstanceState.STOPPING}
    await until(bus, lambda ss: not any(s in live for s in ss), "the stop")


async def load(bus: Bus) -> None:
    await bus.emit(proto.Demand(model="tiny", gateway_id="bench"))
    await until(bus, lambda ss: proto.InstanceState.READY in ss, "the model to be ready")


async def run(
    tmp: Path, nats: NatsServer, gguf: Path, chars: int, ctx: int, rounds: int, cache_mib: int
) -> dict[str, list[float]]:
    models = {"tiny": {"url": f"file://{gguf}", "ctx_size": ctx, "args": ["-t", "1"]}}
    stack = Stack(tmp, nats.url, models, agent__slot_cache_mib=cache_mib)
    stack.start()
    bus = await connect(nats.url, "bench")
    out: dict[str, list[float]] = {"ttft": [], "prompt_n": [], "first_n": [], "cold_ttft": []}
    try:
        async with httpx.AsyncClient(timeout=WAIT_S) as c:
            for i in range(rounds):
                prompt = conversation(chars, seed=i)
                _, first = await turn(c, stack.base, prompt)
                await stop(bus)
                await load(bus)  # the restore happens here, before READY
                ttft, t = await turn(c, stack.base, prompt + ADDITION)
                out["ttft"].append(ttft)
                out["prompt_n"].append(t.get("prompt_n", -1))
                out["first_n"].append(first.get("prompt_n", -1))
            for i in range(rounds):  # the next turn asked of a stopped model: start included
                prompt = conversation(chars, seed=100 + i)
                await turn(c, stack.base, prompt)
                await stop(bus)
                ttft, _ = await turn(c, stack.base, prompt + ADDITION)
                out["cold_ttft"].append(ttft)
                await stop(bus)
    finally:
        await bus.close()
        stack.stop()
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="2000", help="conversation sizes, comma separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="tiny,small", help=f"of {sorted(SHAPES)}")
    ap.add_argument("--keep", default="", help="keep logs and files under this folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(args.keep) if args.keep else Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        nats = NatsServer(tmp / "nats")
        nats.start()
        try:
            for shape, tokens in [
                (m, int(t)) for m in args.models.split(",") for t in args.tokens.split(",")
            ]:
                ctx = tokens + 1024
                gguf = tmp / f"{shape}-ctx{ctx}.gguf"
                for k, v in SHAPES[shape].items():
                    setattr(make_tiny_gguf, k, v)
                make_tiny_gguf.N_CTX = ctx  # its trained context caps a slot's
                make_tiny_gguf.write(gguf, 3)
                chars = int(tokens / 1.28)  # measured; prompt_n below says exactly
                res = {}
                for name, mib in (("warm", 4096), ("cold", 0)):
                    folder = tmp / f"{shape}-{name}-{tokens}"
                    folder.mkdir(parents=True, exist_ok=True)
                    res[name] = await run(folder, nats, gguf, chars, ctx, args.rounds, mib)
                w, c = res["warm"], res["cold"]
                print(
                    f"{shape} model, conversation of {med(w['first_n']):.0f} tokens, "
                    f"{args.rounds} rounds "
                    f"(median), model stopped and loaded again before the next turn:"
                )
                for name, r in (("restore", w), ("no restore", c)):
                    print(
                        f"  {name:<10}  next-turn TTFT {med(r['ttft']) * 1000:7.1f} ms   "
                        f"prompt tokens evaluated {med(r['prompt_n']):6.0f}   "
                        f"(asked while stopped, start included: "
                        f"{med(r['cold_ttft']) * 1000:7.1f} ms)"
                    )
                print(
                    f"  TTFT ratio no-restore/restore: {med(c['ttft']) / med(w['ttft']):.2f}x; "
                    f"start included: {med(c['cold_ttft']) / med(w['cold_ttft']):.2f}x; "
                    f"prompt tokens evaluated: {med(c['prompt_n']):.0f} vs "
                    f"{med(w['prompt_n']):.0f}",
                    flush=True,
                )
        finally:
            nats.stop()


if __name__ == "__main__":
    asyncio.run(main())
