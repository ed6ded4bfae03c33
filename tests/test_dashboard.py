"""The dashboard on real parts: the UI service against a real NATS server, driven by Chromium."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

import proto
from conftest import free_port, require
from lls.bus import Bus, connect
from lls.config import parse
from lls.service import ServiceContext
from services.ui.hub import Hub
from services.ui.secret import SECRET_HEADER, ui_secret
from services.ui.service import run

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path("/tmp/dashboard.png")
XSS = '<img src=x onerror="window.__xss=1">'
# The UI answers only the gateway, which adds this after its admin check; tests stand in for it.
GATEWAY = {SECRET_HEADER: ui_secret()}


def host(host_id: str, gpus: int = 2, used: int = 3000) -> proto.HostRecord:
    t = time.time()
    return proto.HostRecord(
        host_id=host_id,
        ts=t,
        started_at=t - 600,
        runtime="process",
        gpus=[
            proto.GpuInfo(
                index=i,
                uuid=f"GPU-{host_id}-{i}",
                name="NVIDIA RTX 4090",
                memory_total_mib=24564,
                memory_used_mib=used * (i + 1),
                memory_claimed_mib=4096 * (i + 1),
                utilization_pct=37,
                temperature_c=61,
                power_w=212.5,
                simulated=True,
            )
            for i in range(gpus)
        ],
        cpu_count=16,
        ram_total_mib=65536,
        ram_free_mib=40000,
        instances=["i-ready"],
        files=[proto.FileInfo(model="demo", filename="demo.gguf", size=4_683_073_536)],
    )


def instance(iid: str, state: proto.InstanceState, **kw: object) -> proto.InstanceRecord:
    t = time.time()
    return proto.InstanceRecord(
        instance_id=iid, model="demo", state=state, created=t - 90, updated=t, **kw
    )


@pytest.fixture
async def start_ui(nats_url: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """start_ui() -> base URL of a UI service running in this event loop."""
    stops: list[tuple[ServiceContext, asyncio.Task]] = []

    async def start() -> str:
        cfg = parse({"models": {"demo": {"url": "file:///models/demo.gguf"}}})
        ctx = ServiceContext(
            name="ui", cfg=cfg, bus=await connect(nats_url, "ui"), host_id="t", port=free_port()
        )
        task = asyncio.create_task(run(ctx))
        stops.append((ctx, task))
        base = f"http://127.0.0.1:{ctx.port}"
        async with httpx.AsyncClient(headers=GATEWAY) as http:
            for _ in range(100):
                if task.done():
                    task.result()  # raises what made the service stop
                try:
                    if (await http.get(base + "/dashboard/state")).status_code == 200:
                        return base
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError("the UI service did not start within 5 s")

    yield start
    for ctx, task in stops:
        ctx.stop.set()
        await asyncio.wait_for(task, 10)
        await ctx.bus.close()


async def test_state_replays_recent_past(bus: Bus, start_ui) -> None:
    await bus.put(bus.hosts, "h1", host("h1"))
    await bus.emit(proto.HostJoined(host_id="h1", gpus=2, runtime="process"))
    for b in range(0, 100, 10):  # a finished download: no bar, one log row
        await bus.emit(proto.DownloadProgress(model="old", host="h1", bytes=b, total=100))
    await bus.emit(proto.DownloadCompleted(model="old", host="h1", filename="o.gguf", size=100))
    await bus.emit(proto.DownloadProgress(model="big", host="h1", bytes=5, total=100))

    base = await start_ui()
    async with httpx.AsyncClient(headers=GATEWAY) as http:
        state = (await http.get(base + "/dashboard/state")).json()
        for path in ("/dashboard", "/dashboard/"):
            page = await http.get(base + path)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]

    assert set(state["hosts"]) == {"h1"}
    assert state["hosts"]["h1"]["gpus"][1]["memory_claimed_mib"] == 8192
    assert state["hosts"]["h1"]["files"] == [
        {"model": "demo", "filename": "demo.gguf", "size": 4_683_073_536}
    ]
    assert [e["name"] for e in state["events"]] == ["host.joined", "download.completed"]
    assert list(state["downloads"]) == ["h1/big"]
    assert state["models"] == ["demo"]


def test_slow_client_is_bounded_and_resynced() -> None:
    hub = Hub(maxlen=10)
    client = hub.subscribe()
    client.take()
    client.resync = False
    for i in range(1000):
        hub.publish("event", str(i).encode())
    assert len(client.queue) == 10 and client.dropped == 990
    assert client.resync  # the stream sends a snapshot instead of the stale deltas


@pytest.mark.browser
async def test_page_updates_live(bus: Bus, start_ui) -> None:
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    await bus.put(bus.hosts, "gpu-a", host("gpu-a"))
    base = await start_ui()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(
                viewport={"width": 1280, "height": 1000}, extra_http_headers=GATEWAY
            )
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(base + "/dashboard")
            await expect(page.locator("#conn")).to_have_text("live", timeout=5000)
            await expect(page.locator('[data-host="gpu-a"]')).to_be_visible()
            await expect(page.locator('[data-model="demo"]')).to_contain_text("not loaded")

            # Everything below arrives while the page is open: no reload.
            await bus.put(bus.hosts, "gpu-b", host("gpu-b", gpus=1, used=20000))
            await bus.emit(proto.HostJoined(host_id="gpu-b", gpus=1, runtime="process"))
            ready = instance(
                "i-ready",
                proto.InstanceState.READY,
                host="gpu-a",
                gpus=[0],
                memory_mib=4096,
                endpoint="http://127.0.0.1:39001",
                reason="binpack: most free memory after placement",
                ready_at=time.time() - 75,
            )
            failed = instance(
                "i-failed", proto.InstanceState.FAILED, host="gpu-b", gpus=[0], reason=XSS
            )
            await bus.put(bus.instances, "i-ready", ready)
            await bus.put(bus.instances, "i-failed", failed)
            await bus.emit(
                proto.InstanceChanged(
                    instance_id="i-ready",
                    model="demo",
                    state=proto.InstanceState.READY,
                    host="gpu-a",
                    endpoint="http://127.0.0.1:39001",
                )
            )
            await bus.emit(
                proto.InstanceChanged(
                    instance_id="i-failed",
                    model="demo",
                    state=proto.InstanceState.FAILED,
                    host="gpu-b",
                    reason=XSS,
                )
            )
            await bus.emit(
                proto.DownloadProgress(
                    model="qwen2.5-7b",
                    host="gpu-b",
                    bytes=3 << 30,
                    total=5 << 30,
                    rate_bps=2e8,
                    eta_s=11,
                )
            )

            await expect(page.locator('[data-host="gpu-b"]')).to_contain_text("NVIDIA RTX 4090")
            await expect(page.locator('[data-instance="i-ready"]')).to_contain_text("ready")
            await expect(page.locator('[data-kind="instance.ready"]')).to_contain_text("demo")
            bar = page.locator('[data-download="gpu-b/qwen2.5-7b"] [role=progressbar]')
            await expect(bar).to_have_attribute("aria-valuenow", "60.0")
            # Event data is text, never markup.
            await expect(page.locator('[data-kind="instance.failed"]')).to_contain_text(XSS)
            assert await page.evaluate("window.__xss") is None
            assert await page.locator("#events img").count() == 0

            # A swap in progress: the yielding instance and the requests waiting per model.
            draining = instance(
                "i-drain",
                proto.InstanceState.DRAINING,
                host="gpu-a",
                gpus=[0],
                memory_mib=1024,
                drain_for="other",
                drain_since=time.time() - 1,
                reason="yielding to other, which waits",
            )
            await bus.put(bus.instances, "i-drain", draining)
            queues = {"demo": proto.ModelQueue(7, time.time() - 2)}
            report = proto.ActivityReport(
                gateway_id="gw1", ts=time.time(), queues=queues, draining=["i-drain"]
            )
            await bus.put(bus.activity, "gw1", report)
            await bus.emit(
                proto.SwapChanged(
                    model="other",
                    stage="draining",
                    yielding=["i-drain"],
                    yielding_models=["demo"],
                    reason="no room",
                )
            )
            await expect(page.locator('[data-instance="i-drain"]')).to_contain_text("draining")
            await expect(page.locator('[data-queue="demo"]')).to_have_text("7")
            await expect(page.locator("#n-waiting")).to_have_text("7")
            await expect(page.locator('[data-kind="swap.draining"]')).to_contain_text("yield")

            await page.wait_for_timeout(300)  # let the bar's transition settle
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            await bus.emit(
                proto.DownloadCompleted(
                    model="qwen2.5-7b", host="gpu-b", filename="q.gguf", size=5 << 30
                )
            )
            await expect(bar).to_have_count(0)
            await expect(page.locator('[data-kind="download.completed"]')).to_be_visible()

            # The same page behind a trailing slash finds its stream too (relative URLs).
            page2 = await browser.new_page(extra_http_headers=GATEWAY)
            await page2.goto(base + "/dashboard/")
            await expect(page2.locator('[data-instance="i-ready"]')).to_be_visible(timeout=5000)
            assert errors == []
        finally:
            await browser.close()


async def test_ui_answers_only_the_gateway(start_ui) -> None:
    """Without the gateway's secret the UI gives nothing away, and errors read like ours."""
    base = await start_ui()
    async with httpx.AsyncClient() as http:
        for path in ("/dashboard", "/dashboard/state", "/dashboard/events", "/nope"):
            r = await http.get(base + path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "ui_secret_required"
        r = await http.get(base + "/dashboard/state", headers={SECRET_HEADER: "a guess"})
        assert r.status_code == 401
        r = await http.get(base + "/dashboard/nope", headers=GATEWAY)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "code"}
