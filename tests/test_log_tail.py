"""A running instance's llama-server log tail, on demand: the agent answers on its host's
subject (bounded, only for instances it runs, never a path from the request), the UI asks for
it, the gateway serves it at /dashboard/instances/<id>/log, and the page shows it on a click.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from test_agent import (
    Agents,
    agent_config,
    agents,  # noqa: F401 - fixture
    new_iid,
    place,
    start_cmd,
    unique_host,
    wait_state,
)
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM, XSS

import proto
from conftest import require
from lls.bus import Bus
from lls.config import parse
from services.agent.runtime import Handle, bounded_tail
from services.agent.runtime_docker import DockerRuntime
from services.agent.runtime_process import ProcessRuntime
from stack import Stack

LISTENING = "listening on http://"  # llama-server: "llama_server: listening on http://..."
ADMIN = "admin-key-123456"


# ---------------------------------------------------------------- bounds (pure)


def test_tails_are_bounded_by_lines_and_bytes() -> None:
    log = b"".join(b"line %d\n" % i for i in range(1000))
    assert bounded_tail(log, 3, 1 << 20) == (["line 997", "line 998", "line 999"], True)
    assert bounded_tail(b"a\nb\n", 10, 1 << 20) == (["a", "b"], False)
    # cut to the byte bound: the partial first line is dropped, and it says so
    lines, truncated = bounded_tail(log, 200, 30)
    assert truncated and lines == ["line 997", "line 998", "line 999"]
    # read from an offset: the first line may be partial
    assert bounded_tail(b"ne 5\nline 6\n", 10, 100, mid_line=True, more=True) == (["line 6"], True)


def test_docker_asks_the_engine_for_one_line_more_than_wanted() -> None:
    """The engine does not say whether a log holds more: one line more tells."""
    asked: list[int] = []

    class Container:
        def logs(self, tail: int) -> bytes:
            asked.append(tail)
            return b"".join(b"l%d\n" % i for i in range(5))[-3 * tail :]

    class Client:
        class containers:  # noqa: N801 - the Docker SDK's shape
            @staticmethod
            def get(_cid: str) -> Container:
                return Container()

    rt = DockerRuntime(Client(), "h", Path("/nowhere"), "img")
    h = Handle("m-0123abcd", "m", 1, container_id="c")
    assert rt.log_lines(h, 2, 1024) == (["l3", "l4"], True)
    assert rt.log_lines(h, 5, 1024) == (["l0", "l1", "l2", "l3", "l4"], False)
    assert asked == [3, 6]


# ---------------------------------------------------------------- the agent on the bus


async def ask(bus: Bus, host: str, body: dict[str, Any] | bytes) -> proto.LogTailReply:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    msg = await bus.nc.request(proto.logs(host), data, timeout=5)
    return proto.decode(msg.data, proto.LogTailReply)


async def test_an_agent_answers_with_its_running_instances_log_and_reads_nothing_else(
    agents: Agents,  # noqa: F811
    bus: Bus,
    tmp_path: Path,
    tiny_gguf: Callable[[int], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[str] = []
    real = ProcessRuntime.log_lines

    def spy(self: ProcessRuntime, h: Handle, lines: int, max_bytes: int) -> Any:
        reads.append(h.instance_id)
        return real(self, h, lines, max_bytes)

    monkeypatch.setattr(ProcessRuntime, "log_lines", spy)
    host, filename = await agents.start_with_tiny(tiny_gguf(1))
    other = unique_host()  # a second host that runs nothing
    await agents.start(parse(agent_config(tmp_path, other)), other)
    iid = new_iid()
    await place(bus, host, start_cmd(iid, filename))
    rec = await wait_state(bus, iid, proto.InstanceState.READY, proto.InstanceState.FAILED)
    assert rec.state == proto.InstanceState.READY, rec.reason + rec.log_tail

    tail = await ask(bus, host, {"instance_id": iid, "lines": 200})
    assert isinstance(tail, proto.LogTail) and tail.instance_id == iid
    assert any(LISTENING in line for line in tail.lines), tail.lines
    three = await ask(bus, host, {"instance_id": iid, "lines": 3})
    assert isinstance(three, proto.LogTail) and len(three.lines) == 3 and three.truncated
    huge = await ask(bus, host, {"instance_id": iid, "lines": 10**9})
    assert isinstance(huge, proto.LogTail) and len(huge.lines) <= proto.LOG_TAIL_MAX_LINES
    assert reads == [iid] * 3

    # Forged or malformed requests: an error reply, and no log is read.
    forged: list[tuple[str, dict[str, Any] | bytes, str]] = [
        (other, {"instance_id": iid}, "not_found"),  # another host's instance
        (host, {"instance_id": new_iid()}, "not_found"),  # not running anywhere
        (host, {"instance_id": "../../../etc/passwd-0123abcd"}, "invalid"),
        (host, {"instance_id": "tiny.-0123abcd/x"}, "invalid"),
        (host, {"instance_id": iid, "path": "/etc/passwd"}, "invalid"),  # no path field
        (host, {"instance_id": iid, "lines": "all"}, "invalid"),
        (host, b"not json", "invalid"),
    ]
    for to, body, code in forged:
        reply = await ask(bus, to, body)
        assert isinstance(reply, proto.LogTailError) and reply.code == code, (body, reply)
    assert reads == [iid] * 3


# ---------------------------------------------------------------- through the gateway


@pytest.fixture
def stack(
    tmp_path: Path, nats_url: str, llama_server_bin: Path, tiny_gguf: Callable[[int], Path]
) -> Iterator[Stack]:
    s = Stack(tmp_path, nats_url, {"tiny": {"url": f"file://{tiny_gguf(6)}", "ctx_size": 512}})
    s.patch_config(gateway={"api_keys": [{"key": ADMIN, "admin": True}]})
    s.start()
    yield s
    s.stop()


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


async def running_instance(stack: Stack) -> str:
    """Start `tiny` with a request; its instance id, once the dashboard lists it ready."""
    async with httpx.AsyncClient(base_url=stack.base, headers=admin(), timeout=60) as http:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while True:
            instances = (await http.get("/dashboard/state")).json()["instances"]
            ready = [i for i in instances.values() if i["state"] == "ready"]
            if ready:
                return ready[0]["instance_id"]
            assert time.monotonic() < deadline, instances
            await asyncio.sleep(0.1)


async def log_of(stack: Stack, iid: str, query: str = "") -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.base, headers=admin(), timeout=10) as http:
        return await http.get(f"/dashboard/instances/{iid}/log{query}")


def error(r: httpx.Response, status: int) -> str:
    """The message of an error answer in the project's form, with this status."""
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "code"}
    return r.json()["error"]["message"]


async def put_ready(bus: Bus, iid: str, host: str) -> None:
    """A READY record of `iid` on `host` (what a forger with the operator's identity writes)."""
    t = proto.now()
    rec = proto.InstanceRecord(
        instance_id=iid, model="tiny", state=proto.InstanceState.READY, created=t, updated=t,
        host=host,
    )  # fmt: skip
    await bus.put(bus.instances, proto.instance_key(host, iid), rec)


async def test_the_dashboard_serves_a_running_instances_log_tail_to_admins(
    stack: Stack, bus: Bus
) -> None:
    iid = await running_instance(stack)
    r = await log_of(stack, iid, "?lines=200")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["instance_id"] == iid and body["host"] == "h1"
    assert any(LISTENING in line for line in body["lines"]), body["lines"]
    assert len((await log_of(stack, iid, "?lines=2")).json()["lines"]) == 2
    async with httpx.AsyncClient(timeout=10) as http:  # no admin key: nothing
        assert (await http.get(f"{stack.base}/dashboard/instances/{iid}/log")).status_code == 401

    error(await log_of(stack, "not an id"), 400)
    error(await log_of(stack, "tiny..-0123abcd"), 404)  # well formed, unknown
    error(await log_of(stack, iid, "?lines=all"), 400)
    r = await log_of(stack, "..%2F..%2Fetc%2Fpasswd")  # never an instance, whatever routes it
    assert r.status_code in (400, 404), r.text

    # Forged records: on this host, which does not run it; on a host nobody answers for;
    # on a host whose "agent" never answers.
    here, nobody, silent = new_iid(), new_iid(), new_iid()
    await put_ready(bus, here, "h1")
    await put_ready(bus, nobody, "gone")
    await put_ready(bus, silent, "stuck")
    await bus.nc.subscribe(proto.logs("stuck"))  # takes requests, answers none
    deadline = time.monotonic() + 5
    while (r := await log_of(stack, nobody)).status_code == 404:  # the view catches up
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.1)
    assert "gone" in error(r, 504)
    assert "does not run on host h1" in error(await log_of(stack, here), 404)
    t0 = time.monotonic()
    assert "did not answer" in error(await log_of(stack, silent), 504)
    assert 1.5 < time.monotonic() - t0 < 5  # the UI's short deadline, then a clear answer


def append_to_log(tmp_path: Path, iid: str, line: str) -> None:
    """A line in the instance's llama-server log, as if the server wrote it."""
    [log_file] = tmp_path.rglob(f"run/*/h1/{iid}.log")  # the process runtime's run dir
    with log_file.open("ab") as f:
        f.write(line.encode() + b"\n")


@pytest.mark.browser
async def test_clicking_a_running_instance_shows_its_log_live(stack: Stack, tmp_path: Path) -> None:
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    iid = await running_instance(stack)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{stack.base}/dashboard?key={ADMIN}")  # as an admin opens it
            row = page.locator(f'[data-instance="{iid}"]')
            await expect(row).to_contain_text("ready", timeout=10000)
            await row.click()
            tail = page.locator(f'[data-detail="{iid}"] [data-log="{iid}"]')
            await expect(tail).to_contain_text(LISTENING)
            # What the server logs while the details are open shows up, as text.
            append_to_log(tmp_path, iid, XSS)
            await expect(tail).to_contain_text(XSS, timeout=10000)
            assert await page.evaluate("window.__xss") is None
            assert await page.locator("#instances img").count() == 0
            await row.click()
            await expect(tail).to_have_count(0)
            assert errors == []
        finally:
            await browser.close()
